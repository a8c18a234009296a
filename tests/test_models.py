"""Model-level behaviour: published parameter counts, scan == unrolled, remat, caches,
dropout/eval, logical axes and input validation. Numerics vs NumPy live in
test_models_reference.py."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llm_jax as lj
from llm_jax.models import (
    BERT,
    GPT,
    T5,
    KVCache,
    LayerKV,
    ModelConfig,
    _xla_cpu,
    build,
    count_params,
)
from llm_jax.models.init import init_scheme
from llm_jax.models.layers import block_spec, num_inputs

FINGERPRINT = Path(__file__).parent / "fixtures" / "init_fingerprint.json"

RTOL, ATOL = 1e-4, 1e-5

TINY = {
    "gpt2": ModelConfig.preset("gpt2-tiny"),
    "llama": ModelConfig.preset("llama-tiny"),
    "bert": ModelConfig.preset("bert-tiny"),
    "albert": ModelConfig.preset("bert-tiny", embedding_dim=32, share_layers=True),
    "t5": ModelConfig.preset("t5-tiny"),
    "transformer": ModelConfig.preset(
        "transformer-base", vocab_size=512, d_model=64, num_layers=2, num_heads=4, d_ff=128
    ),
}


def tokens(shape=(2, 8), seed=0, vocab=512):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


def apply(model, toks, **kw):
    """Logits of any family for a [B, T] batch (T5: the same tokens on both sides)."""
    if isinstance(model, T5):
        return model(toks, toks, **kw)
    return model(toks, **kw)


# Parameter counts ---------------------------------------------------------------------------


def abstract(cfg):
    return nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))


def test_published_parameter_counts():
    # GPT2LMHeadModel (tied head): 124,439,808.
    assert count_params(abstract(ModelConfig.preset("gpt2-small"))) == 124_439_808
    # GPT2LMHeadModel gpt2-medium: 354,823,168.
    assert count_params(abstract(ModelConfig.preset("gpt2-medium"))) == 354_823_168
    # BertModel with pooler, i.e. without the MLM and NSP heads: 109,482,240.
    bert = abstract(ModelConfig.preset("bert-base", use_mlm_head=False, use_nsp=False))
    assert count_params(bert) == 109_482_240
    # T5ForConditionalGeneration t5-small (tied): 60,506,624.
    assert count_params(abstract(ModelConfig.preset("t5-small"))) == 60_506_624
    # LLaMA-3.2-1B (tied embeddings): 1,235,814,400.
    assert count_params(abstract(ModelConfig.preset("llama-1b"))) == 1_235_814_400


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_every_preset_builds_abstractly_with_logical_axes(name):
    model = abstract(ModelConfig.preset(name))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.get_value().ndim, path
        if path[0] in ("layers", "encoder", "decoder") and "blocks" in path:
            assert axes[0] == "layers", path
    assert "total parameters" in lj.models.param_table(model)


# scan == unrolled, remat == none ---------------------------------------------------------------


def loss_and_grads(cfg, toks):
    model = build(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params):
        logits = apply(nnx.merge(graphdef, params), toks)
        total, count = lj.ops.cross_entropy(logits[:, :-1], toks[:, 1:])
        return total / count

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return value, jax.tree.leaves(grads)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "albert", "t5"])
def test_scan_equals_unrolled_and_remat_changes_nothing(family):
    cfg, toks = TINY[family], tokens()
    ref_value, ref_grads = loss_and_grads(cfg, toks)
    variants = [
        cfg.replace(scan_layers=True),
        cfg.replace(remat_policy="full"),
        cfg.replace(scan_layers=True, remat_policy="dots"),
    ]
    for variant in variants:
        value, grads = loss_and_grads(variant, toks)
        np.testing.assert_allclose(value, ref_value, rtol=1e-6)
        for g, ref in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, ref, rtol=RTOL, atol=1e-6)


# Dropout and eval mode --------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_eval_is_deterministic_and_dropout_needs_a_key(family):
    cfg = TINY[family].replace(dropout_rate=0.1, attention_dropout_rate=0.1)
    model = build(cfg, rngs=nnx.Rngs(0))
    toks = tokens()
    a, b = apply(model, toks), apply(model, toks)
    np.testing.assert_array_equal(a, b)
    key = jax.random.key(1)
    c, d = apply(model, toks, dropout_rng=key), apply(model, toks, dropout_rng=key)
    np.testing.assert_array_equal(c, d)
    e = apply(model, toks, dropout_rng=jax.random.key(2))
    assert not np.allclose(a, c) and not np.allclose(c, e)


# Cached decoding == full forward -----------------------------------------------------------------


@pytest.mark.parametrize("heads_major", [False, True])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpt_cached_decode_equals_full_forward(family, heads_major):
    model = GPT(TINY[family], rngs=nnx.Rngs(0))
    toks = tokens((2, 10))
    full = model(toks)
    cache = model.init_cache(2, 16, heads_major=heads_major)
    prefill, cache = model.decode_step(toks[:, :4], cache)
    steps = [prefill]
    for t in range(4, 10):
        logits, cache = model.decode_step(toks[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
    assert int(cache.index) == 10


def test_gpt_cached_decode_with_left_padding_matches_unpadded_row():
    model = GPT(TINY["llama"], rngs=nnx.Rngs(0))
    row = tokens((1, 5), seed=3)
    alone = model(row)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), row], axis=1)
    segments = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    positions = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4]])
    logits, _ = model.decode_step(
        padded, model.init_cache(1, 12), positions=positions, segment_ids=segments
    )
    np.testing.assert_allclose(logits[:, 3:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads_major", [False, True])
@pytest.mark.parametrize("family", ["t5", "transformer"])
def test_t5_cached_decode_equals_full_forward(family, heads_major):
    model = T5(TINY[family], rngs=nnx.Rngs(0))
    enc, dec = tokens((2, 7)), tokens((2, 6), seed=1)
    enc_seg = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
    full = model(enc, dec, encoder_segment_ids=enc_seg)
    encoded = model.encode(enc, segment_ids=enc_seg)
    cache = model.init_cache(2, 8, encoded, enc_seg, heads_major=heads_major)
    steps = []
    for t in range(6):
        logits, cache = model.decode_step(dec[:, t : t + 1], cache)
        steps.append(logits)
    scale = float(jnp.max(jnp.abs(full)))
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-6 * scale)


# Soft prompts and features ------------------------------------------------------------------


def test_inputs_embeds_equal_token_path():
    model = GPT(TINY["llama"], rngs=nnx.Rngs(0))
    toks = tokens()
    np.testing.assert_allclose(model(inputs_embeds=model.embed(toks)), model(toks), rtol=1e-6)
    hidden, _ = model.features(toks)
    assert hidden.shape == (2, 8, 64)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    cfg = TINY["gpt2"]
    toks = tokens()
    ref = GPT(cfg, rngs=nnx.Rngs(0))(toks)
    model = GPT(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    out = model(toks)
    assert out.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref))) < 0.05


def test_bert_heads_shapes():
    cfg = TINY["bert"].replace(num_labels=3)
    model = BERT(cfg, rngs=nnx.Rngs(0))
    toks = tokens()
    types = jnp.array([[0] * 4 + [1] * 4] * 2)
    mlm, nsp = model.pretraining_logits(toks, token_type_ids=types)
    assert mlm.shape == (2, 8, 512) and nsp.shape == (2, 2)
    assert model.classify(toks, token_type_ids=types).shape == (2, 3)


# Bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "bert", "t5"])
def test_token_ids_out_of_range_and_wrong_rank(family):
    model = build(TINY[family], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocabulary has 512"):
        apply(model, jnp.array([[1, 2, 512]]))
    with pytest.raises(ValueError, match=r"ids in \[-1"):
        apply(model, jnp.array([[1, -1, 3]]))
    with pytest.raises(ValueError, match="rank 2"):
        apply(model, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        apply(model, jnp.ones((1, 3)))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_sequence_longer_than_position_table(family):
    model = build(TINY[family], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        apply(model, jnp.ones((1, 129), jnp.int32))
    with pytest.raises(ValueError, match="cache"):
        GPT(TINY["gpt2"], rngs=nnx.Rngs(0)).init_cache(1, 200)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(num_heads=3), "num_heads=3 does not divide d_model=64"),
        (dict(num_kv_heads=3), "num_kv_heads=3 does not divide num_heads=4"),
        (dict(norm="batchnorm"), r"norm='batchnorm' is not one of \['layernorm', 'rmsnorm'\]"),
        (dict(activation="tanh"), "activation='tanh' is not one of"),
        (dict(d_model=0), "d_model=0 must be an integer >= 1"),
        (dict(dropout_rate=1.5), r"dropout_rate=1.5 must be in \[0, 1\)"),
        (dict(position="relative"), "only implemented for family='t5'"),
        (dict(use_pooler=True), "BERT options"),
        (dict(remat_policy="some"), "remat_policy='some' is not one of"),
    ],
)
def test_invalid_configs_name_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY["gpt2"].replace(**changes)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = TINY["llama"]
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict({"preset": "llama-tiny", "num_layers": 3}).num_layers == 3
    with pytest.raises(ValueError, match=r"unknown ModelConfig keys .'num_layer'.*valid keys"):
        ModelConfig.from_dict({"preset": "llama-tiny", "num_layer": 3})
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; choose one of"):
        ModelConfig.preset("gpt5")


def test_optional_sizes_are_resolved_once():
    """`head_dim`, `num_kv_heads`, `num_decoder_layers` are concrete after construction;
    configs saved with nulls load; an unchanged default follows the fields it derives from."""
    cfg = TINY["gpt2"]
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.num_decoder_layers) == (16, 4, 2)
    saved = {**cfg.to_dict(), "head_dim": None, "num_kv_heads": None, "num_decoder_layers": None}
    assert ModelConfig.from_dict(saved) == cfg
    wider = cfg.replace(d_model=128, num_heads=8, num_layers=3)
    assert (wider.head_dim, wider.num_kv_heads, wider.num_decoder_layers) == (16, 8, 3)
    explicit = cfg.replace(head_dim=8, num_kv_heads=2)
    assert explicit.replace(num_layers=3).head_dim == 8
    assert explicit.replace(num_heads=8).num_kv_heads == 2


def _fingerprint(cfg: ModelConfig) -> dict:
    model = build(cfg, rngs=nnx.Rngs(0))
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = np.asarray(var.get_value(), np.float64)
        out["/".join(map(str, path))] = {
            "shape": list(a.shape),
            "axes": list(var.get_metadata().get("out_sharding")),
            "dtype": str(var.get_value().dtype),
            "sum": float(a.sum()),
            "sumsq": float((a * a).sum()),
        }
    return out


@pytest.mark.parametrize("name", sorted(json.loads(FINGERPRINT.read_text())))
def test_initial_parameters_are_those_of_the_family_init(name):
    """BlockSpec + InitScheme build the very parameters (paths, shapes, axes, values at a
    fixed seed) of the per-family init they replaced: the fixture was written by
    `_fingerprint` on the code before them (commit 97213fe), under this conftest's flags."""
    expected = json.loads(FINGERPRINT.read_text())[name]
    got = _fingerprint(ModelConfig.from_dict(expected["config"]))
    assert sorted(got) == sorted(expected["params"])
    for path, want in expected["params"].items():
        # Sums agree to float32 rounding of the RNG under other XLA flags or CPUs; any other
        # init (a std, a key, a consumption order) changes them in the first digits.
        assert got[path] == {
            **want,
            "sum": pytest.approx(want["sum"], rel=1e-6, abs=1e-6),
            "sumsq": pytest.approx(want["sumsq"], rel=1e-6),
        }, path


def test_block_spec_and_init_scheme_carry_no_family():
    spec, init = block_spec(TINY["llama"]), init_scheme(TINY["llama"])
    assert (spec.num_kv_heads, spec.head_dim, spec.rope_theta, spec.gated_mlp) == (2, 16, 1e4, True)
    assert block_spec(TINY["gpt2"]).rope_theta is None
    assert init.o == init.mlp_out == 0.02 / 2  # GPT-2: 1/sqrt(2L) with L = 2
    t5 = init_scheme(TINY["t5"])
    assert t5.q == pytest.approx((64 * 16) ** -0.5) and t5.mlp_out == pytest.approx(128**-0.5)
    assert init_scheme(TINY["bert"]).o == 0.02


@nnx.jit(static_argnames="heads_major")
def _t5_cache_after_two_tokens(model, enc, enc_seg, first, heads_major):
    """Encode, then decode two tokens into a fresh cache (jitted: eager T5 ops cost ~20 s)."""
    cache = model.init_cache(
        3, 8, model.encode(enc, segment_ids=enc_seg), enc_seg, heads_major=heads_major
    )
    return model.decode_step(first, cache)[1]


_decode_step = nnx.jit(lambda model, step, cache: model.decode_step(step, cache))


@pytest.mark.parametrize("heads_major", [False, True])
def test_cache_take_rows_gathers_every_batch_tensor(heads_major):
    model = T5(TINY["t5"], rngs=nnx.Rngs(0))
    enc = tokens((3, 5))
    enc_seg = jnp.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]])
    cache = _t5_cache_after_two_tokens(model, enc, enc_seg, tokens((3, 2), seed=1), heads_major)
    rows = jnp.array([2, 0, 0, 1])
    taken = cache.take_rows(rows)
    assert isinstance(taken, KVCache) and isinstance(taken.self_kv, LayerKV)
    assert int(taken.index) == 2 and taken.self_kv.heads_major == heads_major
    for got, full in [
        (taken.self_kv.keys_values(), cache.self_kv.keys_values()),
        (taken.cross_kv.keys_values(), cache.cross_kv.keys_values()),
    ]:
        for g, f in zip(got, full, strict=True):  # [L, B, S, K, H]
            np.testing.assert_array_equal(g, np.asarray(f)[:, [2, 0, 0, 1]])
    np.testing.assert_array_equal(taken.valid, np.asarray(cache.valid)[[2, 0, 0, 1]])
    np.testing.assert_array_equal(taken.encoder_valid, np.asarray(enc_seg != 0)[[2, 0, 0, 1]])
    # Decoding from gathered rows == decoding those rows of the original cache.
    step = tokens((3, 1), seed=2)
    logits, _ = _decode_step(model, step, cache)
    logits_taken, _ = _decode_step(model, jnp.take(step, rows, axis=0), taken)
    np.testing.assert_allclose(logits_taken, np.asarray(logits)[[2, 0, 0, 1]], rtol=1e-6)


def test_cache_logical_axes_follow_the_layout():
    gpt = GPT(TINY["llama"], rngs=nnx.Rngs(0))
    plain = gpt.init_cache(2, 8, heads_major=False).logical_axes()
    major = gpt.init_cache(2, 8, heads_major=True).logical_axes()
    assert plain.self_kv.k == ("layers", "batch", "cache_seq", "kv_heads", "kv")
    assert major.self_kv.k == ("layers", "batch", "kv_heads", "cache_seq", "kv")
    # Values head-major with the cache axis innermost, the axis probs·V contracts.
    assert major.self_kv.v == ("layers", "batch", "kv_heads", "kv", "cache_seq")
    assert plain.valid == ("batch", "cache_seq") and plain.cross_kv is None


# The dense layers' einsums: the o-projection, q/k/v, the MLP.
DENSE_EINSUMS = [
    ("BTNH,NHD->BTD", (2, 3, 4, 5), (4, 5, 6)),
    ("BTD,DNH->BTNH", (2, 3, 6), (6, 4, 5)),
    ("BTF,FD->BTD", (2, 3, 7), (7, 6)),
]


@pytest.mark.parametrize("equation, x_shape, k_shape", DENSE_EINSUMS)
def test_kernel_einsum_equals_einsum(equation, x_shape, k_shape):
    x = jax.random.normal(jax.random.key(0), x_shape)
    kernel = jax.random.normal(jax.random.key(1), k_shape)
    np.testing.assert_allclose(
        _xla_cpu.kernel_einsum(equation, x, kernel),
        jnp.einsum(equation, x, kernel),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("equation, x_shape, k_shape", DENSE_EINSUMS)
def test_output_major_einsum_equals_einsum_of_the_logical_kernel(equation, x_shape, k_shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    kernel = rng.standard_normal(k_shape).astype(np.float32)
    n_in = num_inputs(equation)
    stored = _xla_cpu.to_output_major(kernel, n_in)
    assert stored.shape == k_shape[n_in:] + k_shape[:n_in]
    got = jax.jit(_xla_cpu.output_major_einsum, static_argnums=0)(equation, x, stored)
    want = np.einsum(equation, x.astype(np.float64), kernel.astype(np.float64))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_cpu_tricks_only_on_the_cpu_backend():
    assert _xla_cpu.use_cpu_tricks("cpu")
    assert not _xla_cpu.use_cpu_tricks("gpu") and not _xla_cpu.use_cpu_tricks("tpu")
    assert _xla_cpu.use_cpu_tricks() == (jax.default_backend() == "cpu")


def test_family_mismatch():
    with pytest.raises(ValueError, match="family='gpt'"):
        GPT(TINY["bert"], rngs=nnx.Rngs(0))
