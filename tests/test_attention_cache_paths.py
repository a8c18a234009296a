"""The attention forms of the speed work: the masked softmax's own VJP and attention
beside a cache (batch-1 decoding on XLA:CPU), against float64 twins and the plain path."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llm_jax.models.layers as layers
import llm_jax.sample as lj_sample
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


def _compiled_generate_hlo(model, prompt, monkeypatch) -> str:
    """The optimized HLO of the program `generate` compiles for `prompt`."""
    gen = importlib.import_module("llm_jax.sample.generate")  # the name is also a function
    seen = {}
    real = gen._generate_jit

    def capture(*args):
        seen["hlo"] = real.lower(*args).compile().as_text()
        return real(*args)

    monkeypatch.setattr(gen, "_generate_jit", capture)
    lj_sample.generate(model, prompt, max_new_tokens=4, strategy=lj_sample.Greedy())
    return seen["hlo"]


def test_batch1_decode_loop_neither_copies_the_cache_nor_transposes_a_kernel(monkeypatch):
    # XLA:CPU used to copy every layer's loop-carried cache twice per token (the write was
    # not ordered after the attention's read), transpose each value cache for probs·V,
    # and read the dense kernels contracting their leading axes; see `_xla_cpu`.
    cfg = ModelConfig.preset("gpt2-tiny", d_model=48, num_heads=4, d_ff=80, num_layers=2)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    hlo = _compiled_generate_hlo(model, np.arange(5, dtype=np.int32)[None], monkeypatch)
    # Caches [1, K, S, H] / [1, K, H, S] for any S past the prompt's bucket of 16.
    moved_shapes = {f"f32[1,4,{s},12]" for s in range(17, 64)} | {
        f"f32[1,4,12,{s}]" for s in range(17, 64)
    }
    # Dense kernels, whole or flattened, either way round.
    moved_shapes |= {"f32[48,48]", "f32[48,80]", "f32[80,48]", "f32[48,4,12]", "f32[4,12,48]"}
    moved = []
    for line in hlo.splitlines():
        if " copy(" in line or " transpose(" in line:
            shape = line.split("=", 1)[1].split()[0].split("{")[0]
            if shape in moved_shapes:
                moved.append(line.strip()[:160])
    assert not moved, "\n".join(moved)
