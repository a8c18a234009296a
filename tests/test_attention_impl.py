"""`model.attention_impl`: the Pallas splash kernel (interpret mode on CPU) and the cuDNN
adaptation against the XLA reference `ops.dot_product_attention`, and the selection logic.

Tolerances: the kernels use an online (blockwise) softmax, so float32 results differ from
the reference by rounding only (atol 2e-5 on outputs of size ~1, 1e-4 on gradients);
bfloat16 inputs are compared with the reference run in float32 on the same bfloat16
values, atol 3e-2 (bfloat16's epsilon is 7.8e-3; the kernel rounds q * scale and the
probabilities to bfloat16 before its matmuls).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax import ops
from llm_jax.models import attention_impl as attn
from llm_jax.models import build
from llm_jax.models.config import ModelConfig

B, T, N, K, H = 2, 128, 4, 2, 16


def _qkv(dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, T, N, H))
    k, v = rng.normal(size=(2, B, T, K, H))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _segments():
    """Row 0: two documents and 8 padding slots; row 1: one document, no padding."""
    row0 = np.r_[np.full(70, 1), np.full(50, 2), np.zeros(8)]
    return jnp.asarray(np.stack([row0, np.ones(T)]), jnp.int32)  # [B, T]


def _reference(q, k, v, mask):
    return ops.dot_product_attention(q, k, v, mask=mask.dense)


def _splash(q, k, v, mask):
    return attn.splash_attention(q, k, v, mask, interpret=True)


def test_attention_mask_dense_is_todays_mask():
    seg = _segments()
    m = attn.AttentionMask.of(T, causal=True, segment_ids=seg)
    want = ops.combine_masks(ops.causal_mask(T), ops.segment_mask(seg))
    np.testing.assert_array_equal(m.dense, want)
    assert m.causal and m.q_segments is seg
    np.testing.assert_array_equal(attn.AttentionMask.of(T, causal=True).dense, ops.causal_mask(T))
    np.testing.assert_array_equal(
        attn.AttentionMask.of(T, causal=False, segment_ids=seg).dense, ops.segment_mask(seg)
    )


def test_splash_fp32_values_and_gradients_causal_segments_gqa():
    q, k, v = _qkv()
    mask = attn.AttentionMask.of(T, causal=True, segment_ids=_segments())
    out, ref = _splash(q, k, v, mask), _reference(q, k, v, mask)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=0)
    assert np.all(np.asarray(out)[0, 120:] == 0)  # padding rows are zero, as the reference's

    # Gradients on the row with two documents and padding only (interpret mode is slow).
    q, k, v = q[:1], k[:1], v[:1]
    mask = attn.AttentionMask.of(T, causal=True, segment_ids=_segments()[:1])
    w = jnp.asarray(np.random.default_rng(1).normal(size=(1, T, N, H)), jnp.float32)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, mask) * w)

    got = jax.grad(loss(_splash), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-4, rtol=0)


def test_splash_bf16_values_bidirectional_segments():
    q, k, v = _qkv(jnp.bfloat16, seed=2)
    mask = attn.AttentionMask.of(T, causal=False, segment_ids=_segments())
    out = _splash(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    np.testing.assert_allclose(out.astype(jnp.float32), _reference(*f32, mask), atol=3e-2, rtol=0)


def test_cudnn_adaptation_against_reference(monkeypatch):
    """cuDNN itself needs a GPU (tests/gpu); here jax.nn's XLA implementation stands in for
    it, so what is tested is our adaptation: causal flag, segment mask, zeroed empty rows."""
    real = jax.nn.dot_product_attention

    def as_xla(*args, implementation=None, **kwargs):
        assert implementation == "cudnn"
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(attn.jax.nn, "dot_product_attention", as_xla)
    q, k, v = _qkv()
    mask = attn.AttentionMask.of(T, causal=True, segment_ids=_segments())
    np.testing.assert_allclose(
        attn.cudnn_attention(q, k, v, mask), _reference(q, k, v, mask), atol=2e-5, rtol=0
    )
    dense = ops.padding_mask(_segments() != 0)  # a plain boolean mask (BERT padding)
    np.testing.assert_allclose(
        attn.cudnn_attention(q, k, v, dense),
        ops.dot_product_attention(q, k, v, mask=dense),
        atol=2e-5,
        rtol=0,
    )


def test_resolve_picks_per_backend():
    assert attn.resolve("auto", "cpu") == "xla"
    assert attn.resolve("auto", "gpu") == "cudnn"
    assert attn.resolve("auto", "tpu") == "pallas"
    assert attn.resolve("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="not one of"):
        attn.resolve("flash", "cpu")
    with pytest.raises(ValueError, match="attention_impl"):
        ModelConfig.preset("gpt2-tiny", attention_impl="flash")


def test_why_not_names_each_limit():
    q, k, _ = _qkv()
    qb = q.astype(jnp.bfloat16)
    m = attn.AttentionMask.of(T, causal=True)
    assert attn.why_not("xla", q, k, m.dense, jnp.zeros((1,)), True, "cpu") is None
    assert "NVIDIA GPU" in attn.why_not("cudnn", qb, k, m, None, False, "cpu")
    assert "bfloat16" in attn.why_not("cudnn", q, k, m, None, False, "gpu")
    assert attn.why_not("cudnn", qb, k, m, None, False, "gpu") is None
    odd = jnp.zeros((1, T, N, 12), jnp.bfloat16)
    assert "multiple of 8" in attn.why_not("cudnn", odd, k, m, None, False, "gpu")
    assert "bias" in attn.why_not("pallas", q, k, m, jnp.zeros((1,)), False, "tpu")
    assert "dropout" in attn.why_not("pallas", q, k, m, None, True, "tpu")
    assert "dense" in attn.why_not("pallas", q, k, m.dense, None, False, "tpu")
    assert "multiples of 128" in attn.why_not("pallas", q[:, :100], k, m, None, False, "tpu")
    assert attn.why_not("pallas", q, k, m, None, False, "tpu") is None


def test_fallback_runs_the_reference_and_says_why_once(capsys, monkeypatch):
    monkeypatch.setattr(attn, "_said", set())
    q, k, v = _qkv()
    dense = ops.causal_mask(T)
    for _ in range(2):
        out = attn.attention(q, k, v, dense, impl="cudnn")
    np.testing.assert_array_equal(out, ops.dot_product_attention(q, k, v, mask=dense))
    err = capsys.readouterr().err
    assert err.count("cudnn needs an NVIDIA GPU") == 1
    attn.attention(q, k, v, dense, impl="auto")
    assert "attention_impl=auto picked xla on cpu" in capsys.readouterr().err


def test_recording_used_reports_the_implementation_after_fallbacks():
    # What `llm-jax plan` prints: a pallas request on a T that is no multiple of 128 ran xla.
    t = 8
    q, k, v = (x[:, :t] for x in _qkv())
    with attn.recording_used() as used:
        attn.attention(q, k, v, attn.AttentionMask.of(t, causal=True), impl="pallas")
        attn.attention(q, k, v, ops.causal_mask(t), impl="cudnn")
    assert used == {"xla"}
    with attn.recording_used() as used:
        attn.attention(*_qkv(), attn.AttentionMask.of(T, causal=True), impl="pallas")
    assert used == {"pallas"}


def _logits(cfg, tokens, segment_ids):
    model = build(cfg, rngs=nnx.Rngs(0))
    return model(tokens, segment_ids=segment_ids)


def test_models_auto_is_todays_program_and_pallas_matches():
    """auto on CPU is the XLA reference bit for bit (same parameter tree); a GQA LLaMA
    with attention_impl=pallas (interpret mode) gives the same logits within 1e-4."""
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, 500, size=(1, T)), jnp.int32)
    seg = _segments()[:1]
    base = ModelConfig.preset("llama-tiny")
    assert base.attention_impl == "auto"
    want = _logits(base.replace(attention_impl="xla"), tokens, seg)
    np.testing.assert_array_equal(_logits(base, tokens, seg), want)
    got = _logits(base.replace(attention_impl="pallas"), tokens, seg)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-4, atol=1e-4)
    params = nnx.state(build(base.replace(attention_impl="pallas"), rngs=nnx.Rngs(0)), nnx.Param)
    same = nnx.state(build(base, rngs=nnx.Rngs(0)), nnx.Param)
    assert jax.tree.structure(params) == jax.tree.structure(same)


def test_splash_under_a_mesh_runs_per_batch_shard():
    """Inside `activation_sharding` the kernel runs in `shard_map` over the batch axes (XLA
    cannot partition a Pallas call): 8 rows on 8 fake devices, same values."""
    from llm_jax.parallel.mesh import RULES, MeshConfig, make_mesh
    from llm_jax.parallel.rules import activation_sharding

    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, rules="fsdp"))
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(8, T, N, H)), jnp.float32)
    k, v = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, 8, T, K, H)))
    seg = jnp.asarray(np.repeat(np.arange(1, 5), 32)[None].repeat(8, 0), jnp.int32)
    mask = attn.AttentionMask.of(T, causal=True, segment_ids=seg)
    with activation_sharding(mesh, RULES["fsdp"]):
        out = jax.jit(_splash)(q, k, v, mask)
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=2e-5, rtol=0)


def test_cudnn_refusing_a_call_falls_back(capsys, monkeypatch):
    """A limit cuDNN reports itself (NotImplementedError at trace time) runs the reference."""
    monkeypatch.setattr(attn, "_said", set())

    def refuse(*args, **kwargs):
        raise NotImplementedError("Unsupported sequence length")

    monkeypatch.setattr(attn, "cudnn_attention", refuse)
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv())
    dense = ops.causal_mask(T)
    with attn.target_platform("gpu"):
        out = attn.attention(q, k, v, dense, impl="auto")
    np.testing.assert_array_equal(out, ops.dot_product_attention(q, k, v, mask=dense))
    err = capsys.readouterr().err
    assert "auto picked cudnn on gpu" in err and "Unsupported sequence length" in err
