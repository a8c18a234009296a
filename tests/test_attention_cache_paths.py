"""The attention forms of the speed work: the masked softmax's own VJP and attention
beside a cache (batch-1 decoding on XLA:CPU), against float64 twins and the plain path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llm_jax.models.layers as layers
from llm_jax import ops
from llm_jax.models import GPT, ModelConfig
from llm_jax.ops.attention import attention_beside_cache
from tests.reference.ops_ref import attention_ref
from tests.reference.speed_ref import attention_grads_ref


def _mask(rng, shape):
    mask = rng.random(shape) > 0.3
    mask[0, :, -1] = False  # a query that sees no key
    return mask


def test_attention_gradients_match_float64_twin():
    rng = np.random.default_rng(0)
    b, t, s, n, kh, h = 2, 3, 5, 4, 2, 8
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, s, kh, h)).astype(np.float32) for _ in range(2))
    bias = rng.standard_normal((b, n, t, s)).astype(np.float32)
    cot = rng.standard_normal(q.shape).astype(np.float32)
    mask = _mask(rng, (b, n, t, s))

    def loss(q, k, v, bias):
        return jnp.sum(ops.dot_product_attention(q, k, v, mask, bias) * cot)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)
    for got, want in zip(grads, attention_grads_ref(q, k, v, mask, bias, cot), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 3])
def test_attention_beside_cache_equals_attention_over_written_cache(t):
    rng = np.random.default_rng(t)
    b, s, n, kh, h, index = 2, 9, 4, 2, 8, 4
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((b, t, kh, h)).astype(np.float32) for _ in range(2))
    # The old cache's slots index.. hold garbage: they must be read from k_new / v_new.
    k_old, v_old = (rng.standard_normal((b, s, kh, h)).astype(np.float32) for _ in range(2))
    mask = _mask(rng, (b, 1, t, s))
    got = jax.jit(attention_beside_cache)(q, k_new, v_new, k_old, v_old, mask, index)
    k_all, v_all = k_old.copy(), v_old.copy()
    k_all[:, index : index + t], v_all[:, index : index + t] = k_new, v_new
    want = attention_ref(q, k_all, v_all, mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2-tiny", "llama-tiny"])
def test_batch1_head_major_decode_equals_full_forward_and_plain_cache(family, monkeypatch):
    model = GPT(ModelConfig.preset(family), rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(0), (1, 9), 0, 512)
    full = model(toks)

    def decode():
        cache = model.init_cache(1, 12, heads_major=True)
        logits, cache = model.decode_step(toks[:, :4], cache)
        steps = [logits]
        for i in range(4, 9):
            logits, cache = model.decode_step(toks[:, i : i + 1], cache)
            steps.append(logits)
        return jnp.concatenate(steps, axis=1), cache

    calls = []
    real = layers.attend_beside_cache

    def counted(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(layers, "attend_beside_cache", counted)
    logits, cache = decode()
    assert sum(calls) == 5 * model.cfg.num_layers  # every one-token step took the new path
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(layers, "attend_beside_cache", lambda *args: False)
    plain_logits, plain_cache = decode()
    np.testing.assert_allclose(logits, plain_logits, rtol=1e-6, atol=1e-6)
    # Later layers' keys differ in the last bits: their inputs went through the other form.
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(plain_cache), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
