"""Position ops (sinusoidal, learned, RoPE, T5 buckets) against float64 NumPy twins."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_jax import ops
from tests.reference.ops_ref import (
    apply_rope_ref,
    learned_positions_ref,
    llama3_rope_frequencies_ref,
    rope_frequencies_ref,
    sinusoidal_positions_ref,
    t5_relative_position_bias_ref,
    t5_relative_position_bucket_one,
    t5_relative_position_bucket_ref,
)

EPS32 = float(np.finfo(np.float32).eps)


# ---------------------------------------------------------------------------- sinusoidal


def test_sinusoidal_positions_small_table_matches_paper():
    table = np.asarray(ops.sinusoidal_positions(16, 8))
    assert table.shape == (16, 8) and table.dtype == np.float32
    np.testing.assert_allclose(table, sinusoidal_positions_ref(16, 8), rtol=1e-5, atol=1e-6)
    # Interleaved sin/cos: row 1 is [sin 1, cos 1, sin 0.1, cos 0.1, ...] for D = 8.
    expected_row1 = [math.sin(1), math.cos(1), math.sin(0.1), math.cos(0.1)]
    expected_row1 += [math.sin(0.01), math.cos(0.01), math.sin(0.001), math.cos(0.001)]
    np.testing.assert_allclose(table[1], expected_row1, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(table[0], [0, 1, 0, 1, 0, 1, 0, 1])


def test_sinusoidal_positions_long_table_within_float32_angle_error():
    # The float32 angle p * w carries a relative rounding error of a few eps32, i.e. an
    # absolute error ~ eps32 * p, which sin/cos pass on unchanged: that bound grows with p
    # and is the only honest tolerance for row p (a sin/cos swap or a wrong exponent gives
    # O(1) errors).
    p, d = 1024, 64
    table = np.asarray(ops.sinusoidal_positions(p, d))
    ref = sinusoidal_positions_ref(p, d)
    bound = 1e-6 + 2 * EPS32 * np.arange(p)[:, None]
    assert (np.abs(table - ref) <= bound).all(), np.max(np.abs(table - ref) / bound)


def test_sinusoidal_positions_custom_timescale_and_odd_dim():
    np.testing.assert_allclose(
        np.asarray(ops.sinusoidal_positions(8, 6, max_timescale=100.0)),
        sinusoidal_positions_ref(8, 6, max_timescale=100.0),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match=r"even dim"):
        ops.sinusoidal_positions(4, 7)


# ---------------------------------------------------------------------------- learned


def test_learned_positions_gathers_rows():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((10, 6)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3], [9, 5, 5, 0]])
    out = np.asarray(ops.learned_positions(table, positions))
    assert out.shape == (2, 4, 6)
    np.testing.assert_array_equal(out, learned_positions_ref(table, positions))


def test_check_positions():
    ops.check_positions(jnp.arange(8)[None], 8)
    ops.check_positions(jnp.zeros((0,), jnp.int32), 8)
    with pytest.raises(ValueError, match=r"max_position_embeddings") as e:
        ops.check_positions(jnp.arange(9)[None], 8)
    assert "[0, 8]" in str(e.value) and "8 rows" in str(e.value)
    with pytest.raises(ValueError, match=r"position ids span \[-1, 2\]"):
        ops.check_positions(jnp.array([[-1, 2]]), 8)

    # Traced positions have no value: the check is skipped, not an error.
    @jax.jit
    def f(pos):
        ops.check_positions(pos, 8)
        return pos

    f(jnp.arange(20))


# ---------------------------------------------------------------------------- RoPE


def test_rope_frequencies():
    for h in (2, 8, 64, 128):
        np.testing.assert_allclose(
            np.asarray(ops.rope_frequencies(h)), rope_frequencies_ref(h), rtol=1e-5, atol=0
        )
    np.testing.assert_allclose(
        np.asarray(ops.rope_frequencies(16, 500_000.0)),
        rope_frequencies_ref(16, 500_000.0),
        rtol=1e-5,
        atol=0,
    )
    with pytest.raises(ValueError, match=r"even head dim"):
        ops.rope_frequencies(7)


LLAMA32 = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)


@pytest.mark.parametrize("head_dim, kwargs", [(64, LLAMA32), (128, {**LLAMA32, "factor": 8.0})])
def test_llama3_rope_frequencies(head_dim, kwargs):
    got = np.asarray(ops.llama3_rope_frequencies(head_dim, 500_000.0, **kwargs))
    want = llama3_rope_frequencies_ref(head_dim, 500_000.0, **kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    plain = rope_frequencies_ref(head_dim, 500_000.0)
    wavelen = 2 * np.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192 / 1
    # All three regimes occur: kept, slowed by `factor`, blended strictly in between.
    assert short.any() and long.any() and (~short & ~long).any()
    np.testing.assert_array_equal(want[short], plain[short])
    np.testing.assert_allclose(want[long], plain[long] / kwargs["factor"], rtol=1e-12)
    mid = ~short & ~long
    assert ((want[mid] < plain[mid]) & (want[mid] > plain[mid] / kwargs["factor"])).all()


def test_llama3_rope_frequencies_rejects_bad_factors():
    with pytest.raises(ValueError, match="low_freq_factor < high_freq_factor"):
        ops.llama3_rope_frequencies(64, 500_000.0, **{**LLAMA32, "high_freq_factor": 1.0})


@pytest.mark.parametrize("theta", [10_000.0, 500_000.0])
def test_apply_rope_matches_rotate_half(theta):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    positions = rng.integers(0, 8, (2, 5))
    out = ops.apply_rope(x, positions, theta=theta)
    assert out.shape == x.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), apply_rope_ref(x, positions, theta=theta), rtol=1e-5, atol=1e-6
    )


def test_apply_rope_far_positions_within_float32_angle_error():
    # As for the sinusoidal table, the float32 angle error grows like eps32 * position.
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 2, 16)).astype(np.float32)
    positions = rng.integers(0, 4096, (2, 6))
    err = np.abs(np.asarray(ops.apply_rope(x, positions)) - apply_rope_ref(x, positions))
    bound = 1e-6 + 4 * EPS32 * positions[:, :, None, None] * np.abs(x).max()
    assert (err <= bound).all(), np.max(err / bound)


def test_apply_rope_custom_inv_freq_and_bf16():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 4, 2, 8)).astype(np.float32)
    positions = np.array([[0, 3, 5, 7]])
    inv = (0.5 * rope_frequencies_ref(8)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(ops.apply_rope(x, positions, inv_freq=jnp.asarray(inv))),
        apply_rope_ref(x, positions, inv_freq=inv),
        rtol=1e-5,
        atol=1e-6,
    )
    xb = jnp.asarray(x, jnp.bfloat16)
    out = ops.apply_rope(xb, positions)
    assert out.dtype == jnp.bfloat16
    ref = apply_rope_ref(np.asarray(xb.astype(jnp.float32)), positions)
    # Computed in float32 and rounded once to bfloat16: half an ulp, 2^-9 relative.
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), ref, rtol=2.0**-8, atol=1e-6)


def test_rope_position_zero_is_identity():
    x = np.random.default_rng(4).standard_normal((1, 2, 2, 8)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(ops.apply_rope(x, np.zeros((1, 2), int))), x)


def test_rope_scores_depend_only_on_relative_position():
    rng = np.random.default_rng(5)
    h = 16
    q = rng.standard_normal((1, 1, 1, h)).astype(np.float32)
    k = rng.standard_normal((1, 1, 1, h)).astype(np.float32)

    def score(m, n):
        rq = ops.apply_rope(q, np.array([[m]]))
        rk = ops.apply_rope(k, np.array([[n]]))
        return float(jnp.sum(rq * rk))

    norm = float(np.linalg.norm(q) * np.linalg.norm(k))
    for delta in (0, 1, 3, -2, 7):
        scores = [score(m + delta, m) for m in (0, 1, 5, 13, 40)]
        # Float32 angles at positions <= 47: error well under 1e-5 of |q| |k|.
        np.testing.assert_allclose(scores, scores[0], rtol=0, atol=1e-5 * norm)
        ref = apply_rope_ref(q, [[delta]])[0, 0, 0] @ k[0, 0, 0].astype(np.float64)
        np.testing.assert_allclose(scores[0], ref, rtol=0, atol=1e-5 * norm)
    assert abs(score(3, 0) - score(0, 0)) > 1e-2 * norm  # and it does depend on m - n


# ---------------------------------------------------------------------------- T5 buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (16, 64), (64, 300)])
def test_t5_bucket_matches_python_twin(bidirectional, num_buckets, max_distance):
    rel = np.arange(-300, 301)
    out = ops.t5_relative_position_bucket(
        jnp.asarray(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    assert jnp.issubdtype(out.dtype, jnp.integer)
    ref = t5_relative_position_bucket_ref(rel, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(out), ref)
    assert ref.min() == 0 and ref.max() == num_buckets - 1  # the whole range is used


# (relative position, bucket) worked by hand for num_buckets 32, max_distance 128.
# Bidirectional: 16 buckets a side, exact below 8, log(n / 8) / log(16) * 8 above.
BIDIRECTIONAL_KNOWN = [
    (0, 0), (-1, 1), (-7, 7), (-8, 8), (-12, 9), (-20, 10), (-128, 15), (-1000, 15),
    (1, 17), (7, 23), (8, 24), (20, 26), (127, 31), (1000, 31),
]  # fmt: skip
# Causal: all 32 buckets for the past, exact below 16, log(n / 16) / log(8) * 16 above.
CAUSAL_KNOWN = [
    (5, 0), (1, 0), (0, 0), (-1, 1), (-15, 15), (-16, 16), (-20, 17), (-127, 31),
    (-128, 31), (-5000, 31),
]  # fmt: skip


@pytest.mark.parametrize(
    ("bidirectional", "known"), [(True, BIDIRECTIONAL_KNOWN), (False, CAUSAL_KNOWN)]
)
def test_t5_bucket_known_values(bidirectional, known):
    rel = np.array([r for r, _ in known])
    expected = [b for _, b in known]
    out = ops.t5_relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional)
    np.testing.assert_array_equal(np.asarray(out), expected)
    assert [t5_relative_position_bucket_one(r, bidirectional) for r in rel] == expected


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_relative_position_bias(bidirectional):
    rng = np.random.default_rng(6)
    table = rng.standard_normal((32, 3)).astype(np.float32)
    q_pos = np.arange(5)[None]
    k_pos = np.arange(7)[None]
    bias = ops.t5_relative_position_bias(
        table, jnp.asarray(q_pos), jnp.asarray(k_pos), bidirectional=bidirectional
    )
    assert bias.shape == (1, 3, 5, 7)
    ref = t5_relative_position_bias_ref(table, q_pos, k_pos, bidirectional)
    np.testing.assert_array_equal(np.asarray(bias), ref.astype(np.float32))
    # Per-example positions (a decode step at different offsets), far apart.
    q_pos = np.array([[3], [200]])
    k_pos = np.array([np.arange(6), np.arange(150, 156)])
    bias = ops.t5_relative_position_bias(
        table, jnp.asarray(q_pos), jnp.asarray(k_pos), bidirectional=bidirectional, max_distance=64
    )
    assert bias.shape == (2, 3, 1, 6)
    ref = t5_relative_position_bias_ref(table, q_pos, k_pos, bidirectional, max_distance=64)
    np.testing.assert_array_equal(np.asarray(bias), ref.astype(np.float32))


@given(
    st.lists(st.integers(-10_000, 10_000), min_size=1, max_size=8),
    st.booleans(),
    st.sampled_from([(8, 16), (32, 128), (32, 64), (128, 1024)]),
)
def test_t5_bucket_property(rel, bidirectional, buckets):
    num_buckets, max_distance = buckets
    rel = np.array(rel)
    out = ops.t5_relative_position_bucket(
        jnp.asarray(rel),
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
    )
    ref = t5_relative_position_bucket_ref(rel, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(np.asarray(out), ref)
