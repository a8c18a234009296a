"""dot_product_attention and the masks, against float64 NumPy twins and literal matrices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_jax import ops
from tests.reference.ops_ref import (
    attention_ref,
    causal_mask_ref,
    combine_masks_ref,
    padding_mask_ref,
    segment_mask_ref,
)

# One jitted entry point: a new shape costs ~0.1 s to compile under jit and ~0.4 s eager.
attention = jax.jit(ops.dot_product_attention, static_argnames="scale")


def _qkv(rng, b, t, s, n, k, h, dtype=np.float32):
    q = rng.standard_normal((b, t, n, h)).astype(dtype)
    kk = rng.standard_normal((b, s, k, h)).astype(dtype)
    v = rng.standard_normal((b, s, k, h)).astype(dtype)
    return q, kk, v


def _check(q, k, v, mask=None, bias=None, scale=None):
    out = attention(q, k, v, mask, bias, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(
        np.asarray(out), attention_ref(q, k, v, mask, bias, scale), rtol=1e-5, atol=1e-6
    )
    return np.asarray(out)


# ---------------------------------------------------------------------------- head layouts


@pytest.mark.parametrize(
    ("n", "k"), [(4, 4), (8, 2), (6, 3), (4, 1)], ids=["MHA", "GQA-8-2", "GQA-6-3", "MQA"]
)
def test_attention_head_layouts_match_twin(n, k):
    rng = np.random.default_rng(n * 10 + k)
    _check(*_qkv(rng, 2, 3, 5, n, k, 8))


def test_gqa_is_mha_with_each_kv_head_repeated_for_its_group():
    # Query head n reads kv head n // G: repeat (0,0,1,1), not tile (0,1,0,1).
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 1, 3, 4, 8, 2, 4)
    gqa = np.asarray(attention(q, k, v))
    mha = np.asarray(attention(q, np.repeat(k, 4, axis=2), np.repeat(v, 4, axis=2)))
    tiled = np.asarray(attention(q, np.tile(k, (1, 1, 4, 1)), np.tile(v, (1, 1, 4, 1))))
    np.testing.assert_allclose(gqa, mha, rtol=1e-6, atol=1e-7)
    assert np.abs(gqa - tiled).max() > 1e-2


# ---------------------------------------------------------------------------- masks, bias, scale


def test_attention_causal_mask():
    rng = np.random.default_rng(2)
    _check(*_qkv(rng, 2, 5, 5, 4, 2, 8), mask=ops.causal_mask(5))


def test_attention_decode_step_causal_with_offset():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 1, 6, 4, 1, 8)
    mask = ops.causal_mask(1, 6, q_offset=3)
    out = _check(q, k, v, mask=mask)
    # Keys 4 and 5 are in the future of position 3: changing them must change nothing.
    v2 = v.copy()
    v2[:, 4:] += 100.0
    np.testing.assert_array_equal(np.asarray(attention(q, k, v2, mask)), out)


def test_attention_padding_mask():
    rng = np.random.default_rng(4)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    _check(*_qkv(rng, 2, 5, 5, 4, 4, 8), mask=ops.padding_mask(valid))


def test_attention_segment_mask_packed_rows():
    rng = np.random.default_rng(5)
    segments = np.array([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]])
    mask = ops.combine_masks(ops.causal_mask(6), ops.segment_mask(segments))
    out = _check(*_qkv(rng, 2, 6, 6, 4, 2, 8), mask=mask)
    np.testing.assert_array_equal(out[0, 5], 0.0)  # padding token: exact zeros


def test_attention_cross_mask_t_ne_s():
    rng = np.random.default_rng(6)
    mask = ops.cross_mask(np.array([[1, 1, 0]], bool), np.array([[1, 1, 1, 1, 0]], bool))
    _check(*_qkv(rng, 1, 3, 5, 4, 2, 8), mask=mask)


@pytest.mark.parametrize("per_batch", [False, True])
def test_attention_additive_bias(per_batch):
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, 2, 3, 4, 4, 2, 8)
    bias = 3.0 * rng.standard_normal((2 if per_batch else 1, 4, 3, 4)).astype(np.float32)
    _check(q, k, v, bias=bias)
    _check(q, k, v, mask=ops.causal_mask(3, 4, q_offset=1), bias=bias)


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_attention_custom_scale(scale):
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, 2, 3, 4, 4, 2, 8)
    out = _check(q, k, v, scale=scale)
    assert np.abs(out - attention_ref(q, k, v)).max() > 1e-3  # the scale matters


# ---------------------------------------------------------------------------- fully masked rows


def _mask_with_dead_rows():
    mask = np.ones((2, 1, 3, 4), bool)
    mask[0, 0, 1, :] = False  # one dead query in batch 0
    mask[1, 0, :, :] = False  # a whole dead batch row
    mask[0, 0, 2, 3] = False
    return mask


def test_fully_masked_rows_are_exact_zeros():
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, 2, 3, 4, 4, 2, 8)
    bias = rng.standard_normal((1, 4, 3, 4)).astype(np.float32)
    mask = _mask_with_dead_rows()
    for b in (None, bias):
        out = _check(q, k, v, mask=mask, bias=b)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[0, 1], 0.0)
        np.testing.assert_array_equal(out[1], 0.0)
        assert np.abs(out[0, 0]).min() > 0.0


def test_fully_masked_rows_have_finite_zero_gradients():
    rng = np.random.default_rng(10)
    q, k, v = _qkv(rng, 2, 3, 4, 4, 2, 8)
    bias = rng.standard_normal((2, 4, 3, 4)).astype(np.float32)
    cot = rng.standard_normal(q.shape).astype(np.float32)
    mask = _mask_with_dead_rows()

    def loss(q, k, v, bias):
        return jnp.sum(ops.dot_product_attention(q, k, v, mask, bias) * cot)

    gq, gk, gv, gb = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, bias)
    for g in (gq, gk, gv, gb):
        assert np.isfinite(np.asarray(g)).all()
    gq, gk, gv, gb = map(np.asarray, (gq, gk, gv, gb))
    np.testing.assert_array_equal(gq[0, 1], 0.0)
    np.testing.assert_array_equal(gq[1], 0.0)
    np.testing.assert_array_equal(gk[1], 0.0)
    np.testing.assert_array_equal(gv[1], 0.0)
    np.testing.assert_array_equal(gb[1], 0.0)
    assert np.abs(gq[0, 0]).max() > 0.0


def test_attention_dropout_drops_probabilities():
    # With one-hot values (v[s] = e_s) the output row is the probability row itself, so the
    # dropped probabilities can be read off and compared with the twin's softmax.
    rng = np.random.default_rng(12)
    b, t, s, n, k = 2, 3, 6, 4, 2
    q, kk, _ = _qkv(rng, b, t, s, n, k, s)
    v = np.broadcast_to(np.eye(s, dtype=np.float32)[None, :, None, :], (b, s, k, s))
    mask = ops.causal_mask(t, s, q_offset=s - t)
    probs = attention_ref(q, kk, v, mask)  # [B, T, N, S]
    np.testing.assert_array_equal(
        np.asarray(ops.dot_product_attention(q, kk, v, mask, dropout_rate=0.5)),
        np.asarray(ops.dot_product_attention(q, kk, v, mask)),
    )  # no key: eval mode
    rate = 0.25
    out = np.asarray(
        ops.dot_product_attention(q, kk, v, mask, dropout_rate=rate, dropout_rng=jax.random.key(0))
    )
    keep = out != 0
    visible = np.broadcast_to(np.asarray(mask)[:, 0, :, None, :], probs.shape)
    assert 0.5 < keep[visible].mean() < 0.95  # 120 draws around 0.75
    assert not keep[~visible].any()
    np.testing.assert_allclose(out, np.where(keep, probs / (1 - rate), 0.0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- bfloat16


def _naive_bf16_attention(q, k, v, scale):
    # What the op must NOT do: logits, max-subtraction and softmax all in bfloat16.
    logits = jnp.einsum("BTNH,BSNH->BNTS", q, k) * jnp.asarray(scale, jnp.bfloat16)
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits)
    probs = e / jnp.sum(e, axis=-1, keepdims=True)
    return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


def test_bf16_softmax_runs_in_float32():
    # Logits near 256 with O(1) differences: bfloat16 spaces numbers near 256 by 2, so a
    # bfloat16 softmax scrambles the weights, while float32 logits resolve the differences.
    rng = np.random.default_rng(11)
    b, t, s, n, h = 2, 4, 8, 4, 8
    q = rng.standard_normal((b, t, n, h))
    k = rng.standard_normal((b, s, n, h))
    q[..., 0], k[..., 0] = 16.0, 16.0
    v = rng.standard_normal((b, s, n, h))
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    ref = attention_ref(*(np.asarray(a.astype(jnp.float32)) for a in (q, k, v)), scale=1.0)

    out = attention(q, k, v, scale=1.0)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out.astype(jnp.float32)) - ref).max()
    # The op rounds probabilities and the output to bfloat16 (relative 2^-9 each).
    tol = 4 * 2.0**-8 * np.abs(ref).max()
    assert err < tol, (err, tol)
    naive = np.asarray(_naive_bf16_attention(q, k, v, 1.0).astype(jnp.float32))
    assert np.abs(naive - ref).max() > 10 * tol


# ---------------------------------------------------------------------------- errors


def test_attention_rejects_wrong_ranks():
    x4 = jnp.zeros((1, 2, 2, 4))
    with pytest.raises(ValueError, match=r"rank 4"):
        ops.dot_product_attention(jnp.zeros((2, 2, 4)), x4, x4)
    with pytest.raises(ValueError, match=r"rank 4"):
        ops.dot_product_attention(x4, jnp.zeros((1, 2, 2, 4, 1)), x4)


def test_attention_rejects_heads_not_divisible():
    q = jnp.zeros((1, 2, 6, 4))
    kv = jnp.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"num_kv_heads dividing num_heads"):
        ops.dot_product_attention(q, kv, kv)


def test_attention_rejects_mismatched_k_v_and_head_dim():
    q = jnp.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"same shape"):
        ops.dot_product_attention(q, jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 2, 2, 4)))
    with pytest.raises(ValueError, match=r"batch or head dim"):
        kv = jnp.zeros((1, 3, 2, 8))
        ops.dot_product_attention(q, kv, kv)


# ---------------------------------------------------------------------------- literal masks


def test_causal_mask_4x4_literal():
    expected = np.array(
        [
            [1, 0, 0, 0],
            [1, 1, 0, 0],
            [1, 1, 1, 0],
            [1, 1, 1, 1],
        ],
        bool,
    )
    m = np.asarray(ops.causal_mask(4))
    assert m.shape == (1, 1, 4, 4) and m.dtype == bool
    np.testing.assert_array_equal(m[0, 0], expected)


def test_causal_mask_decode_step_literal():
    # One query at absolute position 3 against a cache of 5: keys 0..3 visible, key 4 not.
    m = np.asarray(ops.causal_mask(1, 5, q_offset=3))
    assert m.shape == (1, 1, 1, 5)
    np.testing.assert_array_equal(m[0, 0], np.array([[1, 1, 1, 1, 0]], bool))
    m2 = np.asarray(ops.causal_mask(2, 5, q_offset=3))
    np.testing.assert_array_equal(m2[0, 0], np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool))
    # A traced offset (inside jit, as in a decode loop) gives the same matrix.
    traced = jax.jit(lambda o: ops.causal_mask(1, 5, q_offset=o))(jnp.asarray(3))
    np.testing.assert_array_equal(np.asarray(traced), m)


def test_padding_mask_literal():
    valid = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    expected = np.array(
        [
            [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]],
            [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
        ],
        bool,
    )
    m = np.asarray(ops.padding_mask(valid))
    assert m.shape == (2, 1, 4, 4)
    np.testing.assert_array_equal(m[:, 0], expected)


def test_segment_mask_packed_literal():
    expected = np.array(
        [
            [1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    m = np.asarray(ops.segment_mask(np.array([[1, 1, 2, 2, 2, 0]])))
    assert m.shape == (1, 1, 6, 6)
    np.testing.assert_array_equal(m[0, 0], expected)


def test_bidirectional_mask_literal():
    m = np.asarray(ops.bidirectional_mask(np.array([[1, 1, 0]], bool)))
    np.testing.assert_array_equal(m[0, 0], np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], bool))
    full = np.asarray(ops.bidirectional_mask(length=3))
    assert full.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(full, np.ones((1, 1, 3, 3), bool))
    with pytest.raises(ValueError, match=r"`valid` or `length`"):
        ops.bidirectional_mask()


def test_cross_mask_literal():
    m = np.asarray(ops.cross_mask(np.array([[1, 1, 0]], bool), np.array([[1, 1, 1, 0, 0]], bool)))
    expected = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], bool)
    assert m.shape == (1, 1, 3, 5)
    np.testing.assert_array_equal(m[0, 0], expected)


def test_combine_causal_and_segment_literal():
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    seg = ops.segment_mask(np.array([[1, 1, 2, 2, 2, 0]]))
    m = np.asarray(ops.combine_masks(ops.causal_mask(6), None, seg))
    assert m.shape == (1, 1, 6, 6)
    np.testing.assert_array_equal(m[0, 0], expected)
    assert ops.combine_masks(None, None) is None
    assert ops.combine_masks() is None


# ---------------------------------------------------------------------------- properties


@st.composite
def _attention_case(draw):
    b = draw(st.integers(1, 2))
    t = draw(st.integers(1, 4))
    s = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3))
    g = draw(st.integers(1, 3))
    h = draw(st.sampled_from([1, 2, 4]))
    kind = draw(st.sampled_from(["none", "random", "random_per_head", "causal", "segment"]))
    dead_rows = draw(st.booleans())
    use_bias = draw(st.booleans())
    scale = draw(st.sampled_from([None, 1.0, 0.5]))
    seed = draw(st.integers(0, 2**31 - 1))
    return b, t, s, k * g, k, h, kind, dead_rows, use_bias, scale, seed


@given(_attention_case())
def test_attention_matches_twin_property(case):
    b, t, s, n, k, h, kind, dead_rows, use_bias, scale, seed = case
    rng = np.random.default_rng(seed)
    q, kk, v = _qkv(rng, b, t, s, n, k, h)
    if kind == "none":
        mask = None
    elif kind == "random":
        mask = rng.random((b, 1, t, s)) < 0.6
    elif kind == "random_per_head":
        mask = rng.random((b, n, t, s)) < 0.6
    elif kind == "causal":
        offset = int(rng.integers(0, max(s - t, 0) + 1))
        mask = np.asarray(ops.causal_mask(t, s, q_offset=offset))
        np.testing.assert_array_equal(mask, causal_mask_ref(t, s, offset))
    else:
        qseg = rng.integers(0, 3, (b, t))
        kseg = rng.integers(0, 3, (b, s))
        mask = np.asarray(ops.segment_mask(qseg, kseg))
        np.testing.assert_array_equal(mask, segment_mask_ref(qseg, kseg))
    if dead_rows:
        mask = np.ones((b, 1, t, s), bool) if mask is None else mask
        mask = np.broadcast_to(mask, (b, *mask.shape[1:])).copy()
        mask[rng.integers(0, b), :, rng.integers(0, t), :] = False
    bias = rng.standard_normal((1, n, t, s)).astype(np.float32) if use_bias else None
    out = _check(q, kk, v, mask, bias, scale)
    if mask is not None:
        dead = ~np.broadcast_to(mask, (b, n, t, s)).any(-1)  # [B, N, T]
        np.testing.assert_array_equal(out.transpose(0, 2, 1, 3)[dead], 0.0)


@given(
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 5),
    st.integers(0, 2**31 - 1),
)
def test_mask_builders_match_twins_property(b, t, s, seed):
    rng = np.random.default_rng(seed)
    qv, kv = rng.random((b, t)) < 0.7, rng.random((b, s)) < 0.7
    np.testing.assert_array_equal(np.asarray(ops.padding_mask(qv, kv)), padding_mask_ref(qv, kv))
    np.testing.assert_array_equal(np.asarray(ops.cross_mask(qv, kv)), padding_mask_ref(qv, kv))
    np.testing.assert_array_equal(np.asarray(ops.bidirectional_mask(qv)), padding_mask_ref(qv))
    qs, ks = rng.integers(0, 3, (b, t)), rng.integers(0, 3, (b, s))
    seg = np.asarray(ops.segment_mask(qs, ks))
    np.testing.assert_array_equal(seg, segment_mask_ref(qs, ks))
    causal = np.asarray(ops.causal_mask(t, s, q_offset=s - t))
    np.testing.assert_array_equal(causal, causal_mask_ref(t, s, s - t))
    np.testing.assert_array_equal(
        np.asarray(ops.combine_masks(causal, seg)), combine_masks_ref(causal, seg)
    )
