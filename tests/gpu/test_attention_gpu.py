"""cuDNN attention on an NVIDIA GPU against the XLA reference; run by benchmarks/gpu_suite.sh
(`JAX_PLATFORMS=cuda pytest tests/gpu`). Skipped on other backends: cuDNN needs the GPU.

Tolerances: bfloat16 / float16 inputs, the reference run in float32 on the same values;
outputs of size ~1 within 3e-2 (bfloat16 epsilon 7.8e-3, cuDNN rounds the probabilities to
the input dtype before the second matmul), gradients within 5e-2.
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

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU backend"
)

B, T, N, K, H = 2, 256, 8, 2, 64


def _inputs(dtype):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype)
    k, v = (jnp.asarray(a, dtype) for a in rng.normal(size=(2, B, T, K, H)))
    row0 = np.r_[np.full(100, 1), np.full(140, 2), np.zeros(16)]
    seg = jnp.asarray(np.stack([row0, np.ones(T)]), jnp.int32)
    return q, k, v, attn.AttentionMask.of(T, causal=True, segment_ids=seg)


def _f32(*xs):
    return [x.astype(jnp.float32) for x in xs]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cudnn_values_causal_segments_gqa(dtype):
    q, k, v, mask = _inputs(dtype)
    assert attn.why_not("cudnn", q, k, mask, None, False, "gpu") is None
    out = jax.jit(lambda q, k, v: attn.cudnn_attention(q, k, v, mask))(q, k, v)
    ref = ops.dot_product_attention(*_f32(q, k, v), mask=mask.dense)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=0)
    assert np.all(np.asarray(out, np.float32)[0, 240:] == 0)  # padding rows


def test_cudnn_gradients():
    q, k, v, mask = _inputs(jnp.bfloat16)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * w)

    got = jax.jit(jax.grad(loss(lambda *a: attn.cudnn_attention(*a, mask)), argnums=(0, 1, 2)))(
        q, k, v
    )
    want = jax.grad(
        loss(lambda *a: ops.dot_product_attention(*a, mask=mask.dense)), argnums=(0, 1, 2)
    )(*_f32(q, k, v))
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=5e-2, rtol=0)


def test_auto_picks_cudnn_and_head_dim_limit_falls_back():
    assert attn.resolve("auto") == "cudnn"
    odd = jnp.zeros((1, T, N, 12), jnp.bfloat16)
    assert "multiple of 8" in attn.why_not("cudnn", odd, odd, None, None, False, "gpu")


def test_llama_with_cudnn_matches_xla():
    cfg = ModelConfig.preset("llama-tiny", dtype="bfloat16", max_position_embeddings=T)
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, 500, size=(B, T)), jnp.int32)
    _, _, _, mask = _inputs(jnp.bfloat16)
    seg = mask.q_segments
    model = build(cfg.replace(attention_impl="xla"), rngs=nnx.Rngs(0))
    fused = build(cfg.replace(attention_impl="cudnn"), rngs=nnx.Rngs(0))
    want = np.asarray(model(tokens, segment_ids=seg), np.float32)
    got = np.asarray(fused(tokens, segment_ids=seg), np.float32)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(got[real], want[real], atol=5e-2, rtol=0)
