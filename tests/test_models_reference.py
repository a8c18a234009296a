"""Whole-model forward passes (JAX, float32) against float64 NumPy references.

The references (`tests/reference/models_ref.py`) are written from the papers: GPT-2, LLaMA
(GQA and MQA), BERT, ALBERT, T5 v1.0, T5 v1.1 and the original Transformer. Each reference
runs one unpadded document, so padded batches (segment id 0) and packed rows (segment ids
1, 1, 2, 2, ... with positions restarting per document) are checked by running every
document on its own and comparing the real positions.

Parameters are redrawn before comparing: the default init has zero biases and unit norm
gains (a dropped bias or gain would go unnoticed) and std-0.02 weights that make attention
almost uniform (a wrong RoPE or relative bias would barely show). The redraw gives every
parameter a distinct value and O(1) attention logits, while keeping the models well
conditioned enough for float32 to meet rtol 1e-4 / atol 1e-5 (checked by
`test_comparisons_are_well_conditioned`).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.models import BERT, GPT, T5, ModelConfig
from tests.reference.models_ref import bert_ref, gpt2_ref, llama_ref, t5_ref, transformer_ref

RTOL, ATOL = 1e-4, 1e-5

CONFIGS = {
    "gpt2": ModelConfig.preset("gpt2-tiny"),
    "llama": ModelConfig.preset("llama-tiny"),  # GQA: 4 query heads, 2 key/value heads
    "llama_mqa": ModelConfig.preset("llama-tiny", num_kv_heads=1),
    # head_dim 16, theta 1e4, context 64: frequencies in all three llama3 regimes.
    "llama3_rope": ModelConfig.preset(
        "llama-tiny", rope_type="llama3", rope_factor=4.0, rope_original_max_position=64
    ),
    "bert": ModelConfig.preset("bert-tiny", num_labels=3),
    "albert": ModelConfig.preset("bert-tiny", num_labels=3, embedding_dim=32, share_layers=True),
    "t5_v1_0": ModelConfig.preset("t5-tiny"),
    "t5_v1_1": ModelConfig.preset("t5-tiny").replace(
        activation="gelu_tanh", gated_mlp=True, tie_embeddings=False, scale_tied_logits=False
    ),
    "transformer": ModelConfig.preset("transformer-base").replace(
        vocab_size=300, d_model=64, num_layers=2, num_heads=4, d_ff=128
    ),
}
MODEL_CLASSES = {"gpt": GPT, "bert": BERT, "t5": T5}

# Largest errors seen, per variant: {variant: [normwise, elementwise, fraction of tolerance]}.
ERRORS: dict[str, list[float]] = {}


# ---------------------------------------------------------------------------- parameters


def _redraw(
    path: tuple[str, ...], value: np.ndarray, rng: np.random.Generator, *, fold_scale: bool
) -> np.ndarray:
    """A fresh value for one parameter, by its role (its name in the parameter tree).

    `fold_scale`: the model does not scale q.k by 1/sqrt(H) (T5), so, as in T5's own
    init, the query kernel carries it. Without it T5's attention logits come out sqrt(H)
    times too large, and the model becomes so ill-conditioned that a one-ulp change of the
    float32 parameters moves the logits by more than the test's tolerance.
    """
    name = path[-1]
    shape = value.shape
    if name == "scale":  # norm gains
        return 1.0 + 0.2 * rng.standard_normal(shape)
    if name in ("bias", "mlm_bias"):
        return 0.2 * rng.standard_normal(shape)
    if name == "kernel":
        # Fan-in init: q/k/v kernels [..., D, N, H] read D, the output kernel [..., N, H, D]
        # reads N * H, everything else [..., in, out] reads `in`.
        parent = path[-2]
        if parent == "q" and fold_scale:
            fan_in = shape[-3] * shape[-1]
        elif parent in ("q", "k", "v"):
            fan_in = shape[-3]
        elif parent == "o":
            fan_in = shape[-3] * shape[-2]
        else:
            fan_in = shape[-2]
        return rng.standard_normal(shape) / np.sqrt(fan_in)
    # Token / position / type embeddings and T5 relative-position tables. Std 0.25 keeps
    # the tied heads' logits O(1): with larger tables the half-ulp noise floor measured by
    # `test_comparisons_are_well_conditioned` climbs past half the tolerance.
    return 0.25 * rng.standard_normal(shape)


def _map_with_path(fn, tree, path=()):
    if isinstance(tree, dict):
        return {k: _map_with_path(fn, v, (*path, str(k))) for k, v in tree.items()}
    return fn(path, tree)


def _set_params(model: nnx.Module, fn) -> None:
    """Replace every parameter x (at tree path `path`) of `model` by fn(path, x as numpy)."""
    state = nnx.state(model, nnx.Param)
    new = _map_with_path(
        lambda path, x: jnp.asarray(fn(path, np.asarray(x)), x.dtype), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)


def _build(variant: str):
    """(cfg, model, float64 parameter dict) of a variant, with redrawn parameters."""
    cfg = CONFIGS[variant]
    model = MODEL_CLASSES[cfg.family](cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(sorted(CONFIGS).index(variant))
    _set_params(model, lambda path, x: _redraw(path, x, rng, fold_scale=not cfg.attention_scale))
    params = _map_with_path(
        lambda _, x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    return cfg, model, params


@pytest.fixture(scope="module")
def built():
    """`built(variant)`: `_build`, once per variant for the whole module."""
    return functools.cache(_build)


# ---------------------------------------------------------------------------- batches

B = 2
# Segment ids per case, [B, T]: 0 is padding; packed rows hold several documents.
SEGMENTS = {
    "random": None,
    "padded": [[1] * 10, [1] * 6 + [0] * 4],
    "packed": [[1] * 4 + [2] * 3 + [3] * 3, [1] * 5 + [2] * 3 + [0] * 2],
}
T5_SEGMENTS = {  # (encoder segment ids [B, S], decoder segment ids [B, T])
    "random": (None, None),
    "encoder_padded": ([[1] * 16, [1] * 11 + [0] * 5], None),
    "padded": ([[1] * 16, [1] * 11 + [0] * 5], [[1] * 12, [1] * 8 + [0] * 4]),
    "packed": (
        [[1] * 6 + [2] * 10, [1] * 5 + [2] * 8 + [0] * 3],
        [[1] * 4 + [2] * 8, [1] * 5 + [2] * 6 + [0]],
    ),
}
# Lengths 16 and 12 reach t5-tiny's logarithmic buckets (distances >= 4 bidirectional,
# >= 8 causal), where `relative_max_distance` matters.


def _documents(segment_ids, batch: int, length: int) -> list[tuple[int, int, int, int]]:
    """(row, segment id, start, end) of every document; one per row without segment ids."""
    if segment_ids is None:
        return [(b, 1, 0, length) for b in range(batch)]
    docs = []
    for b, row in enumerate(np.asarray(segment_ids)):
        for seg in sorted(set(row.tolist()) - {0}):
            where = np.flatnonzero(row == seg)
            assert np.all(np.diff(where) == 1), "a document must be contiguous"
            docs.append((b, seg, int(where[0]), int(where[-1]) + 1))
    return docs


def _restarting_positions(segment_ids) -> np.ndarray:
    """Positions 0, 1, ... restarting at each document (0 on padding)."""
    seg = np.asarray(segment_ids)
    pos = np.zeros(seg.shape, np.int32)
    for b, _, lo, hi in _documents(seg, *seg.shape):
        pos[b, lo:hi] = np.arange(hi - lo)
    return pos


def _optional(x):
    return None if x is None else jnp.asarray(np.asarray(x, np.int32))


# ---------------------------------------------------------------------------- comparison


def _check(variant: str, what: str, got, want) -> None:
    """assert_allclose(got, want) at RTOL / ATOL, printing and recording the errors."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.abs(got - want)
    normwise = float(err.max() / np.abs(want).max())
    nonzero = np.abs(want) > 0
    elementwise = float((err[nonzero] / np.abs(want[nonzero])).max())
    tol_used = float((err / (ATOL + RTOL * np.abs(want))).max())
    print(
        f"{variant:12s} {what:28s} max|d|/max|ref| {normwise:.2e}  "
        f"max elementwise rel {elementwise:.2e}  tolerance used {tol_used:.2f}"
    )
    prev = ERRORS.get(variant, [0.0, 0.0, 0.0])
    ERRORS[variant] = [max(prev[0], normwise), max(prev[1], elementwise), max(prev[2], tol_used)]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{variant}: {what}")


@pytest.fixture(scope="module", autouse=True)
def _error_summary():
    yield
    print(
        "\nlargest JAX-vs-reference errors per variant "
        "(max|d|/max|ref|, max elementwise rel, fraction of tolerance):"
    )
    for variant in sorted(ERRORS):
        normwise, elementwise, used = ERRORS[variant]
        print(f"  {variant:12s} {normwise:.2e}  {elementwise:.2e}  {used:.2f}")


# ---------------------------------------------------------------------------- GPT family


def _gpt_reference(variant, cfg, params, tokens):
    if variant == "gpt2":
        return gpt2_ref(params, tokens)
    scaling = None if cfg.rope_scaling is None else dict(cfg.rope_scaling)
    return llama_ref(
        params, tokens, eps=cfg.norm_eps, rope_theta=cfg.rope_theta, rope_scaling=scaling
    )


@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("variant", ["gpt2", "llama", "llama_mqa", "llama3_rope"])
def test_gpt_matches_reference(variant, case, built):
    cfg, model, params = built(variant)
    seg = SEGMENTS[case]
    length = 10
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (B, length))
    positions = None if case != "packed" else _restarting_positions(seg)
    logits = model(
        jnp.asarray(tokens, jnp.int32), positions=_optional(positions), segment_ids=_optional(seg)
    )
    logits = np.asarray(logits)
    got, want = [], []
    for b, _, lo, hi in _documents(seg, B, length):
        got.append(logits[b, lo:hi])
        want.append(_gpt_reference(variant, cfg, params, tokens[b, lo:hi]))
    _check(variant, f"{case} logits", np.concatenate(got), np.concatenate(want))


# ---------------------------------------------------------------------------- BERT family


@pytest.mark.parametrize("case", sorted(SEGMENTS))
@pytest.mark.parametrize("variant", ["bert", "albert"])
def test_bert_matches_reference(variant, case, built):
    cfg, model, params = built(variant)
    seg = SEGMENTS[case]
    length = 10
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, cfg.vocab_size, (B, length))
    types = rng.integers(0, cfg.type_vocab_size, (B, length))
    kwargs = dict(token_type_ids=_optional(types), segment_ids=_optional(seg))
    if case == "packed":
        kwargs["positions"] = _optional(_restarting_positions(seg))
    hidden = model.encode(jnp.asarray(tokens, jnp.int32), **kwargs)
    jax_out = {"hidden": hidden, "mlm_logits": model.mlm_logits(hidden)}
    pooled = model.pool(hidden)
    jax_out.update(
        pooled=pooled,
        nsp_logits=model.nsp_logits(pooled),
        class_logits=model.classify(jnp.asarray(tokens, jnp.int32), **kwargs),
    )
    jax_out = {k: np.asarray(v) for k, v in jax_out.items()}

    got = {k: [] for k in jax_out}
    want = {k: [] for k in jax_out}
    for b, _, lo, hi in _documents(seg, B, length):
        ref = bert_ref(
            params,
            tokens[b, lo:hi],
            types[b, lo:hi],
            num_layers=cfg.num_layers,
            albert=variant == "albert",
        )
        for k in ("hidden", "mlm_logits"):
            got[k].append(jax_out[k][b, lo:hi])
            want[k].append(ref[k])
        if lo == 0:  # the pooler reads the row's first token: its first document's [CLS]
            for k in ("pooled", "nsp_logits", "class_logits"):
                got[k].append(jax_out[k][b][None])
                want[k].append(ref[k][None])
    for k in jax_out:
        _check(variant, f"{case} {k}", np.concatenate(got[k]), np.concatenate(want[k]))


# ---------------------------------------------------------------------------- T5 family


def _t5_reference(variant, cfg, params, enc_tokens, dec_tokens):
    if variant == "transformer":
        return transformer_ref(params, enc_tokens, dec_tokens, eps=cfg.norm_eps)
    version = "1.0" if variant == "t5_v1_0" else "1.1"
    return t5_ref(
        params, enc_tokens, dec_tokens, version=version, max_distance=cfg.relative_max_distance
    )


@pytest.mark.parametrize("case", sorted(T5_SEGMENTS))
@pytest.mark.parametrize("variant", ["t5_v1_0", "t5_v1_1", "transformer"])
def test_t5_matches_reference(variant, case, built):
    cfg, model, params = built(variant)
    enc_seg, dec_seg = T5_SEGMENTS[case]
    enc_len, dec_len = 16, 12
    rng = np.random.default_rng(3)
    enc_tokens = rng.integers(0, cfg.vocab_size, (B, enc_len))
    dec_tokens = rng.integers(0, cfg.vocab_size, (B, dec_len))
    kwargs = dict(encoder_segment_ids=_optional(enc_seg), decoder_segment_ids=_optional(dec_seg))
    if case == "packed":
        kwargs.update(
            encoder_positions=_optional(_restarting_positions(enc_seg)),
            decoder_positions=_optional(_restarting_positions(dec_seg)),
        )
    logits = np.asarray(
        model(jnp.asarray(enc_tokens, jnp.int32), jnp.asarray(dec_tokens, jnp.int32), **kwargs)
    )

    # Source document of each target document: the same segment id in the same row.
    sources = {(b, seg): (lo, hi) for b, seg, lo, hi in _documents(enc_seg, B, enc_len)}
    got, want = [], []
    for b, seg, lo, hi in _documents(dec_seg, B, dec_len):
        src_lo, src_hi = sources[(b, seg)]
        got.append(logits[b, lo:hi])
        want.append(
            _t5_reference(variant, cfg, params, enc_tokens[b, src_lo:src_hi], dec_tokens[b, lo:hi])
        )
    _check(variant, f"{case} logits", np.concatenate(got), np.concatenate(want))


# ---------------------------------------------------------------------------- conditioning


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_comparisons_are_well_conditioned(variant, built):
    """Rounding the parameters to float32 must cost well under the tolerance.

    Each parameter is moved by a relative 2^-24 (half a float32 ulp): the logits' change is
    then the float32 noise floor of the comparisons above. If it used most of the tolerance,
    a mismatch there could be rounding rather than a bug (and `_redraw` should be revisited,
    never the tolerance).
    """
    cfg, model, _ = built(variant)
    rng = np.random.default_rng(4)
    enc = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 16)), jnp.int32)
    dec = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 12)), jnp.int32)

    def logits(m):
        if cfg.family == "t5":
            return np.asarray(m(enc, dec), np.float64)
        return np.asarray(m(dec), np.float64)

    perturbed = nnx.clone(model)
    _set_params(perturbed, lambda _, x: x * (1.0 + 2.0**-24 * rng.standard_normal(x.shape)))
    base = logits(model)
    err = np.abs(logits(perturbed) - base)
    tol_used = float((err / (ATOL + RTOL * np.abs(base))).max())
    print(f"{variant:12s} half-ulp parameter noise uses {tol_used:.2f} of the tolerance")
    assert tol_used < 0.5, (variant, tol_used)
