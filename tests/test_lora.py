"""LoRA: the adapted dense op, models with adapters, merging, PEFT adapter folders, the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llm_jax as lj
from llm_jax.cli import main
from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.convert.hf_weights import flatten_tree, unflatten_tree
from llm_jax.finetune import is_lora_path, lora_target_names, merge_lora, merge_lora_params
from llm_jax.finetune.peft import load_peft_adapter, save_peft_adapter
from llm_jax.models import build
from llm_jax.models.layers import Einsum, LoRA
from llm_jax.sample.adapters import as_decoder
from tests.reference.ops_ref import lora_dense_ref

PRESETS = ["gpt2-tiny", "llama-tiny", "bert-tiny", "t5-tiny"]
TOKENS = np.random.RandomState(0).randint(1, 500, (2, 8)).astype(np.int32)


def lora_model(name: str, *, trained: bool = True, **fields):
    """A tiny model with LoRA; `trained`: B drawn at random (as after training) instead of
    its zero init, so that the adapters change the function."""
    fields = {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ("all_linear",), **fields}
    cfg = lj.ModelConfig.preset(name, **fields)
    model = build(cfg, rngs=nnx.Rngs(0))
    if not trained:
        return model
    flat = flatten_tree(params_of(model))
    for i, path in enumerate(sorted(flat)):
        if path.endswith("/lora_b"):
            flat[path] = 0.1 * jax.random.normal(jax.random.key(i), flat[path].shape)
    return model_from_params(cfg, unflatten_tree(flat))


def forward(model, tokens=TOKENS, **kwargs):
    tokens = jnp.asarray(tokens)
    if model.cfg.family == "t5":
        return model(tokens, tokens, **kwargs)
    return model(tokens, **kwargs)


# --- the op ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "equation, shape, n_in",
    [("BTD,DNH->BTNH", (8, 2, 3), 1), ("BTNH,NHD->BTD", (2, 3, 8), 2), ("BTD,DF->BTF", (8, 5), 1)],
)
def test_lora_dense_matches_float64_twin(equation, shape, n_in):
    lora = LoRA(rank=3, alpha=6.0, dropout=0.0)
    layer = Einsum(
        equation, shape, ("a",) * len(shape), std=0.5, lora=lora, rngs=nnx.Rngs(0),
        bias_shape=shape[n_in:], bias_axes=("b",) * (len(shape) - n_in),
    )  # fmt: skip
    layer.lora_b[...] = jax.random.normal(jax.random.key(1), layer.lora_b.shape)
    layer.bias[...] = jax.random.normal(jax.random.key(2), layer.bias.shape)
    assert layer.lora_a.ndim - 1 == n_in
    x = jax.random.normal(jax.random.key(3), (2, 3, *shape[:n_in]))
    want = lora_dense_ref(
        x, layer.kernel[...], layer.lora_a[...], layer.lora_b[...], 2.0, bias=layer.bias[...]
    )
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-6)


def test_lora_factors_shapes_axes_and_init():
    """A [in..., R] drawn U(+-1/sqrt(in)) as PEFT does, B [R, out...] zero; the rank axis is
    `lora_rank`, which no sharding rule splits and which counts as a weight axis for decay."""
    from llm_jax.parallel import RULES, logical_axes
    from llm_jax.train.optimizer import decay_mask

    model = lora_model("llama-tiny", trained=False)
    o = model.layers.blocks.self_attn.o
    assert o.lora_a.shape == (2, 4, 16, 4) and o.lora_b.shape == (2, 4, 64)
    assert np.all(np.asarray(o.lora_b[...]) == 0)
    assert np.abs(np.asarray(o.lora_a[...])).max() <= 64**-0.5
    assert np.asarray(o.lora_a[...]).std() > 0.5 * 64**-0.5 / np.sqrt(3)
    axes = flatten_tree(logical_axes(model))
    assert axes["layers/blocks/self_attn/o/lora_a"] == ("layers", "heads", "kv", "lora_rank")
    assert axes["layers/blocks/self_attn/q/lora_b"] == ("layers", "lora_rank", "heads", "kv")
    assert all("lora_rank" not in rules for rules in RULES.values())
    mask = flatten_tree(decay_mask(logical_axes(model)))
    assert all(mask[p] for p in mask if is_lora_path(p))


# --- config ---------------------------------------------------------------------------------


def test_bad_target_names_list_the_available_ones():
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no dense layer") as err:
        lj.ModelConfig.preset("gpt2-tiny", lora_rank=4, lora_targets=["q", "c_attn"])
    assert "'q', 'k', 'v', 'o', 'wi', 'wo', 'all_linear'" in str(err.value)
    with pytest.raises(ValueError, match="wi_gate needs gated_mlp=True"):
        lj.ModelConfig.preset("gpt2-tiny", lora_targets=["wi_gate"])
    with pytest.raises(ValueError, match=r"model.lora_rank=-1 must be an integer >= 0"):
        lj.ModelConfig.preset("gpt2-tiny", lora_rank=-1)
    with pytest.raises(ValueError, match=r"model.lora_dropout=1.0 must be in \[0, 1\)"):
        lj.ModelConfig.preset("gpt2-tiny", lora_dropout=1.0)
    cfg = lj.ModelConfig.from_dict(
        {"preset": "llama-tiny", "lora_rank": 2, "lora_targets": "all_linear"}
    )
    assert lora_target_names(cfg) == ("q", "k", "v", "o", "wi", "wi_gate", "wo")
    assert lora_target_names(cfg.replace(lora_targets=["v", "q"])) == ("q", "v")
    assert lora_target_names(cfg.replace(lora_rank=0)) == ()


# --- models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESETS)
def test_step0_equals_the_base_exactly(name):
    """Same seed: the same base parameters plus the factors; B = 0 gives the same logits
    bit for bit. The default config keeps today's parameter tree."""
    base = build(lj.ModelConfig.preset(name), rngs=nnx.Rngs(0))
    model = lora_model(name, trained=False)
    base_flat, flat = flatten_tree(params_of(base)), flatten_tree(params_of(model))
    assert not any(is_lora_path(p) for p in base_flat)
    assert sorted(p for p in flat if not is_lora_path(p)) == sorted(base_flat)
    for path, value in base_flat.items():
        np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value), err_msg=path)
    np.testing.assert_array_equal(np.asarray(forward(model)), np.asarray(forward(base)))


@pytest.mark.parametrize("name", PRESETS)
def test_merged_equals_unmerged(name):
    model = lora_model(name)
    merged = merge_lora(model)
    assert merged.cfg.lora_rank == 0
    base = build(lj.ModelConfig.preset(name), rngs=nnx.Rngs(0))
    assert sorted(flatten_tree(params_of(merged))) == sorted(flatten_tree(params_of(base)))
    unmerged_out, base_out = np.asarray(forward(model)), np.asarray(forward(base))
    assert np.abs(unmerged_out - base_out).max() > 1e-2  # the adapters do something
    np.testing.assert_allclose(np.asarray(forward(merged)), unmerged_out, rtol=1e-5, atol=1e-5)
    cfg, params = merge_lora_params(model.cfg, params_of(model))
    assert cfg == merged.cfg and merge_lora_params(cfg, params)[1] is params


@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny"])
def test_scanned_equals_unrolled(name):
    model = lora_model(name)
    scanned = model_from_params(model.cfg.replace(scan_layers=True), params_of(model))
    np.testing.assert_allclose(
        np.asarray(forward(scanned)), np.asarray(forward(model)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("cpu_tricks", [False, True])
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "t5-tiny"])
def test_cached_decode_equals_full_forward(name, cpu_tricks):
    """Prefill 4 tokens, then one token at a time, through the decoder adapter (the XLA:CPU
    loop form cuts the per-layer weights, LoRA factors included) == the full forward."""
    model = lora_model(name)
    decoder = as_decoder(model, cpu_tricks=cpu_tricks)
    tokens = jnp.asarray(TOKENS)
    b, t = tokens.shape
    ones = jnp.ones((b, 1), jnp.int32)
    if name == "t5-tiny":
        cache = decoder.init_cache(b, t, tokens, jnp.ones_like(tokens))
        chunks = [(i, i + 1) for i in range(t)]
    else:
        cache = decoder.init_cache(b, t)
        chunks = [(0, 4), *[(i, i + 1) for i in range(4, t)]]
    logits = []
    for lo, hi in chunks:
        pos = jnp.broadcast_to(jnp.arange(lo, hi), (b, hi - lo))
        out, cache = decoder.tokens_to_logits(
            tokens[:, lo:hi], pos, jnp.broadcast_to(ones, (b, hi - lo)), cache
        )
        logits.append(out)
    np.testing.assert_allclose(
        np.concatenate(logits, axis=1), np.asarray(forward(model)), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", ["llama-tiny", "t5-tiny"])
def test_lora_dropout_acts_in_training_only(name):
    model = lora_model(name, lora_dropout=0.5)
    no_dropout = model_from_params(model.cfg.replace(lora_dropout=0.0), params_of(model))
    key = jax.random.key(7)
    train_a, train_b = forward(model, dropout_rng=key), forward(no_dropout, dropout_rng=key)
    assert np.abs(np.asarray(train_a) - np.asarray(train_b)).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(forward(model)), np.asarray(forward(no_dropout)))
    np.testing.assert_array_equal(
        np.asarray(forward(model, dropout_rng=key)), np.asarray(train_a)
    )  # deterministic given the key


def test_lora_dropout_keeps_the_other_dropout_keys():
    """Residual/attention dropout draw the same masks with and without LoRA (B = 0)."""
    fields = {"dropout_rate": 0.3, "attention_dropout_rate": 0.2}
    base = build(lj.ModelConfig.preset("gpt2-tiny", **fields), rngs=nnx.Rngs(0))
    model = lora_model("gpt2-tiny", trained=False, **fields)
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        np.asarray(forward(model, dropout_rng=key)), np.asarray(forward(base, dropout_rng=key))
    )


# --- PEFT -----------------------------------------------------------------------------------

PEFT_CASES = [
    ("llama-tiny", ("all_linear",)),
    ("gpt2-tiny", ("q", "v", "wo")),  # the fused c_attn, as a rank-2r block adapter
    ("gpt2-tiny", ("o",)),  # attn.c_proj, not mlp.c_proj
    ("bert-tiny", ("q", "v", "wo")),  # output.dense alone needs a regex
    ("t5-tiny", ("all_linear",)),
]


@pytest.mark.parametrize("name, targets", PEFT_CASES, ids=lambda x: str(x))
def test_peft_round_trip_is_exact(tmp_path, name, targets):
    model = lora_model(name, lora_targets=targets, lora_dropout=0.1)
    params = params_of(model)
    save_peft_adapter(model.cfg, params, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    base = {k: v for k, v in flatten_tree(params).items() if not is_lora_path(k)}
    cfg, loaded = load_peft_adapter(model.cfg.replace(lora_rank=0), unflatten_tree(base), tmp_path)
    assert cfg.lora_layers == model.cfg.lora_layers
    assert cfg.replace(lora_targets=model.cfg.lora_targets) == model.cfg
    want, got = flatten_tree(params), flatten_tree(loaded)
    assert sorted(got) == sorted(want)
    for path in want:
        np.testing.assert_array_equal(got[path], np.asarray(want[path]), err_msg=path)


def test_peft_target_modules_and_errors(tmp_path):
    llama = lora_model("llama-tiny", lora_targets=("q", "v"))
    save_peft_adapter(llama.cfg, params_of(llama), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    gpt2 = lora_model("gpt2-tiny", lora_targets=("q", "v"))
    save_peft_adapter(gpt2.cfg, params_of(gpt2), tmp_path / "g")
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"]
    assert config["rank_pattern"] == {"c_attn": 8} and config["alpha_pattern"] == {"c_attn": 16.0}
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        save_peft_adapter(gpt2.cfg.replace(lora_rank=0), {}, tmp_path / "x")
    with pytest.raises(ValueError, match="is not a PEFT adapter folder"):
        load_peft_adapter(llama.cfg, params_of(llama), tmp_path)
    with pytest.raises(ValueError, match="not LoRA factors of this gpt model"):
        load_peft_adapter(gpt2.cfg, params_of(gpt2), tmp_path / "a")  # a LLaMA adapter
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        load_peft_adapter(llama.cfg, params_of(llama), tmp_path / "a")


@pytest.mark.parametrize("name, targets", PEFT_CASES, ids=lambda x: str(x))
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, name, targets):
    """`PeftModel.from_pretrained(base exported by save_hf, adapter)` == our unmerged model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = lora_model(name, lora_targets=targets)
    save_peft_adapter(model.cfg, params_of(model), tmp_path / "adapter")
    base_cfg, base_params = (
        model.cfg.replace(lora_rank=0),
        {k: v for k, v in flatten_tree(params_of(model)).items() if not is_lora_path(k)},
    )
    lj.convert.save_hf(model_from_params(base_cfg, unflatten_tree(base_params)), tmp_path / "base")
    arch = json.loads((tmp_path / "base" / "config.json").read_text())["architectures"][0]
    hf = getattr(transformers, arch).from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.tensor(TOKENS.astype(np.int64))
    with torch.no_grad():
        if name == "t5-tiny":
            out = peft_model(input_ids=ids, decoder_input_ids=ids).logits
        elif name == "bert-tiny":
            out = peft_model(input_ids=ids).prediction_logits
        else:
            out = peft_model(input_ids=ids).logits
    np.testing.assert_allclose(out.numpy(), np.asarray(forward(model)), rtol=1e-4, atol=1e-4)


# --- the CLI --------------------------------------------------------------------------------


def test_convert_cli_adapters_only_and_merged(tmp_path, capsys):
    model = lora_model("llama-tiny", lora_targets=("q", "v", "wo"))
    lj.convert.save_checkpoint(model, tmp_path / "ckpt")
    run = ["convert", "--from-checkpoint", str(tmp_path / "ckpt"), "--to-hf"]
    assert main([*run, str(tmp_path / "adapter"), "--adapters-only"]) == 0
    base = {k: v for k, v in flatten_tree(params_of(model)).items() if not is_lora_path(k)}
    cfg, params = load_peft_adapter(
        model.cfg.replace(lora_rank=0), unflatten_tree(base), tmp_path / "adapter"
    )
    np.testing.assert_array_equal(
        np.asarray(forward(model_from_params(cfg, params))), np.asarray(forward(model))
    )
    assert main([*run, str(tmp_path / "merged")]) == 0
    merged = lj.convert.load_hf(tmp_path / "merged")
    assert merged.cfg.lora_rank == 0
    np.testing.assert_allclose(
        np.asarray(forward(merged)), np.asarray(forward(model)), rtol=1e-5, atol=1e-5
    )
    capsys.readouterr()
    plain = build(lj.ModelConfig.preset("llama-tiny"), rngs=nnx.Rngs(0))
    lj.convert.save_checkpoint(plain, tmp_path / "plain")
    args = ["convert", "--from-checkpoint", str(tmp_path / "plain"), "--to-hf"]
    assert main([*args, str(tmp_path / "x"), "--adapters-only"]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err
    assert (
        main(["convert", "--from-hf", str(tmp_path / "merged"), "--to", "y", "--adapters-only"])
        == 2
    )
    assert "--adapters-only writes a LoRA run's adapters" in capsys.readouterr().err
