"""Norms, activations, losses and dropout against float64 NumPy twins.

Attention and masks are in test_ops_attention.py, positions in test_ops_positions.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax import ops
from tests.reference.ops_ref import (
    accuracy_ref,
    cross_entropy_grad_ref,
    cross_entropy_ref,
    dropout_ref,
    geglu_ref,
    gelu_ref,
    gelu_tanh_ref,
    glu_ref,
    kl_divergence_ref,
    layer_norm_ref,
    log_softmax_ref,
    logsumexp_ref,
    relu_ref,
    rms_norm_ref,
    silu_ref,
    softmax_ref,
    swiglu_ref,
    t5_layer_norm_ref,
)


def _close(actual, desired, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol)


def _bf16(x):
    return jnp.asarray(x, jnp.bfloat16)


def _as_f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


# ---------------------------------------------------------------------------- norms


@pytest.fixture
def norm_inputs():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 16)) * 2.0 + 0.5).astype(np.float32)
    scale = rng.standard_normal(16).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    return x, scale, bias


def test_layer_norm_matches_twin(norm_inputs):
    x, scale, bias = norm_inputs
    out = ops.layer_norm(x, scale, bias)
    assert out.shape == x.shape and out.dtype == jnp.float32
    _close(out, layer_norm_ref(x, scale, bias))
    _close(ops.layer_norm(x, scale), layer_norm_ref(x, scale))  # no bias
    _close(ops.layer_norm(x, None), layer_norm_ref(x, None))  # no learned gain
    _close(ops.layer_norm(x, scale, bias, eps=1e-1), layer_norm_ref(x, scale, bias, eps=1e-1))


def test_layer_norm_statistics_of_output(norm_inputs):
    x, _, _ = norm_inputs
    y = np.asarray(ops.layer_norm(x, None, eps=0.0), np.float64)
    _close(y.mean(-1), 0.0, atol=1e-6)
    _close(y.var(-1), 1.0)


def test_rms_norm_matches_twin(norm_inputs):
    x, scale, _ = norm_inputs
    out = ops.rms_norm(x, scale)
    assert out.shape == x.shape and out.dtype == jnp.float32
    _close(out, rms_norm_ref(x, scale))
    _close(ops.rms_norm(x, None), rms_norm_ref(x, None))
    _close(ops.rms_norm(x, scale, eps=1e-2), rms_norm_ref(x, scale, eps=1e-2))
    # Gemma-style checkpoints store scale - 1.
    _close(ops.rms_norm(x, scale, scale_offset=1.0), rms_norm_ref(x, scale, scale_offset=1.0))
    _close(ops.rms_norm(x, scale - 1.0, scale_offset=1.0), rms_norm_ref(x, scale))


def test_t5_layer_norm_matches_twin(norm_inputs):
    x, scale, _ = norm_inputs
    _close(ops.t5_layer_norm(x, scale), t5_layer_norm_ref(x, scale))
    # And it is not LayerNorm: the mean is not subtracted.
    assert np.abs(np.asarray(ops.t5_layer_norm(x, scale)) - layer_norm_ref(x, scale)).max() > 1e-2


def test_norms_bf16_in_bf16_out_computed_in_float32():
    # Mean 4 and std 1: bfloat16 spaces numbers near 4 by 2^-5, so a mean rounded to
    # bfloat16 shifts every output by up to ~1.5e-2, far outside half a bfloat16 ulp.
    rng = np.random.default_rng(1)
    x = _bf16(4.0 + rng.standard_normal((4, 64)))
    scale = _bf16(1.0 + 0.1 * rng.standard_normal(64))
    bias = _bf16(0.1 * rng.standard_normal(64))
    xf, sf, bf = _as_f32(x), _as_f32(scale), _as_f32(bias)
    # One rounding of the float32 result to bfloat16: relative 2^-9; rtol 2^-8 allows 2.
    tol = {"rtol": 2.0**-8, "atol": 1e-4}

    out = ops.layer_norm(x, scale, bias)
    assert out.dtype == jnp.bfloat16
    ref = layer_norm_ref(xf, sf, bf)
    _close(_as_f32(out), ref, **tol)
    mean = jnp.mean(x, axis=-1, keepdims=True)  # a bfloat16 mean
    naive = (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), -1, keepdims=True) + 1e-5)
    naive = naive * scale + bias
    with pytest.raises(AssertionError):
        _close(_as_f32(naive), ref, **tol)

    out = ops.rms_norm(x, scale)
    assert out.dtype == jnp.bfloat16
    _close(_as_f32(out), rms_norm_ref(xf, sf), **tol)
    out = ops.t5_layer_norm(x, scale)
    assert out.dtype == jnp.bfloat16
    _close(_as_f32(out), t5_layer_norm_ref(xf, sf), **tol)


# ---------------------------------------------------------------------------- activations


@pytest.fixture
def act_inputs():
    rng = np.random.default_rng(2)
    grid = np.linspace(-12.0, 12.0, 481)
    return np.concatenate([grid, 3.0 * rng.standard_normal(256)]).astype(np.float32)


@pytest.mark.parametrize(
    ("fn", "ref"),
    [
        (ops.relu, relu_ref),
        (ops.gelu, gelu_ref),
        (ops.gelu_tanh, gelu_tanh_ref),
        (ops.silu, silu_ref),
        (lambda x: ops.gelu(x, approximate=True), gelu_tanh_ref),
    ],
    ids=["relu", "gelu", "gelu_tanh", "silu", "gelu_approximate"],
)
def test_activation_matches_twin(fn, ref, act_inputs):
    out = fn(act_inputs)
    assert out.dtype == jnp.float32
    _close(out, ref(act_inputs))


def test_gelu_exact_and_tanh_are_different_functions(act_inputs):
    # Otherwise the two twin comparisons above could not tell them apart.
    assert np.abs(gelu_ref(act_inputs) - gelu_tanh_ref(act_inputs)).max() > 1e-4
    _close(ops.gelu(np.float32([1.0])), [0.8413447460685429])  # 1 * Phi(1)


def test_gated_units_match_twins():
    rng = np.random.default_rng(3)
    gate = (2.0 * rng.standard_normal((2, 3, 16))).astype(np.float32)
    up = rng.standard_normal((2, 3, 16)).astype(np.float32)
    for name in ("relu", "gelu", "gelu_tanh", "silu"):
        _close(ops.glu(gate, up, name), glu_ref(gate, up, name))
    _close(ops.glu(gate, up), swiglu_ref(gate, up))  # default is SwiGLU
    _close(ops.swiglu(gate, up), swiglu_ref(gate, up))
    _close(ops.geglu(gate, up), geglu_ref(gate, up))


def test_get_activation_names_the_valid_choices():
    assert ops.get_activation("silu") is ops.silu
    with pytest.raises(ValueError, match=r"unknown activation 'swish'") as e:
        ops.get_activation("swish")
    for name in ("gelu", "gelu_tanh", "relu", "silu"):
        assert repr(name) in str(e.value)
    with pytest.raises(ValueError, match=r"choose one of"):
        ops.glu(jnp.ones(2), jnp.ones(2), "tanh")


# ---------------------------------------------------------------------------- losses


@pytest.fixture
def ce_inputs():
    rng = np.random.default_rng(4)
    logits = (3.0 * rng.standard_normal((2, 5, 11))).astype(np.float32)
    labels = rng.integers(0, 11, (2, 5))
    weights = rng.random((2, 5)).astype(np.float32)
    weights[1, 3:] = 0.0  # padding
    return logits, labels, weights


def test_softmax_pair_matches_twins_along_any_axis():
    rng = np.random.default_rng(6)
    x = (3.0 * rng.standard_normal((2, 5, 11))).astype(np.float32)
    for axis in (-1, 1, 0):
        moved = np.moveaxis(x, axis, -1)
        _close(ops.softmax(x, axis=axis), np.moveaxis(softmax_ref(moved), -1, axis))
        _close(ops.log_softmax(x, axis=axis), np.moveaxis(log_softmax_ref(moved), -1, axis))
        _close(ops.logsumexp(x, axis=axis), logsumexp_ref(moved))
    _close(np.sum(np.asarray(ops.softmax(x), np.float64), axis=-1), np.ones((2, 5)))


def test_softmax_pair_runs_in_float32():
    rng = np.random.default_rng(7)
    small = (0.5 * rng.standard_normal((3, 13))).astype(np.float32)
    for fn, ref in (
        (ops.softmax, softmax_ref),
        (ops.log_softmax, log_softmax_ref),
        (ops.logsumexp, logsumexp_ref),
    ):
        out = fn(_bf16(small))
        assert out.dtype == jnp.float32
        _close(out, ref(_as_f32(_bf16(small))))


def test_softmax_huge_logits_is_stable_and_logsumexp_of_minus_inf_is_minus_inf():
    rng = np.random.default_rng(8)
    logits = (1e4 * rng.standard_normal((3, 50))).astype(np.float32)
    logits[1] += 3e4
    out = np.asarray(ops.softmax(logits))
    assert np.isfinite(out).all()
    _close(out, softmax_ref(logits))
    _close(ops.logsumexp(logits), logsumexp_ref(logits))
    assert np.asarray(ops.logsumexp(jnp.full((2, 4), -jnp.inf))).tolist() == [-np.inf] * 2


def test_softmax_gradient_matches_the_jacobian():
    # d p_i / d x_j = p_i (delta_ij - p_j), from the twin in float64.
    x = np.array([[0.3, -1.2, 2.0, 0.5]], np.float32)
    p = softmax_ref(x)[0]
    jac = np.asarray(jax.jacobian(lambda x: ops.softmax(x)[0])(jnp.asarray(x)))[:, 0, :]
    _close(jac, np.diag(p) - np.outer(p, p))


def test_log_softmax_huge_logits_is_stable():
    rng = np.random.default_rng(5)
    logits = (1e4 * rng.standard_normal((3, 50))).astype(np.float32)
    logits[1] += 3e4  # and a large common offset
    out = np.asarray(ops.log_softmax(logits))
    assert np.isfinite(out).all() and (out <= 0).all()
    _close(out, log_softmax_ref(logits))
    small = (0.5 * rng.standard_normal((2, 7, 13))).astype(np.float32)
    _close(ops.log_softmax(small), log_softmax_ref(small))
    _close(ops.log_softmax(_bf16(small)), log_softmax_ref(_as_f32(_bf16(small))))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_twin(ce_inputs, label_smoothing, z_loss, weighted):
    logits, labels, weights = ce_inputs
    w = weights if weighted else None
    total, count = ops.cross_entropy(
        logits, labels, w, label_smoothing=label_smoothing, z_loss=z_loss
    )
    assert total.shape == () and count.shape == () and total.dtype == jnp.float32
    ref_total, ref_count = cross_entropy_ref(logits, labels, w, label_smoothing, z_loss)
    _close(total, ref_total)
    _close(count, ref_count)


def test_cross_entropy_gradient_matches_closed_form(ce_inputs):
    logits, labels, weights = ce_inputs

    def loss(x):
        return ops.cross_entropy(x, labels, weights, label_smoothing=0.1, z_loss=1e-2)[0]

    grad = jax.grad(loss)(logits)
    _close(grad, cross_entropy_grad_ref(logits, labels, weights, 0.1, 1e-2))


def test_cross_entropy_label_smoothing_matches_optax(ce_inputs):
    logits, labels, weights = ce_inputs
    eps, v = 0.2, logits.shape[-1]
    targets = (1 - eps) * jax.nn.one_hot(labels, v) + eps / v
    per_token = optax.softmax_cross_entropy(logits, targets)
    total, _ = ops.cross_entropy(logits, labels, weights, label_smoothing=eps)
    _close(total, float(jnp.sum(per_token * weights)))


def test_cross_entropy_huge_logits_and_bf16():
    rng = np.random.default_rng(6)
    logits = (1e4 * rng.standard_normal((4, 20))).astype(np.float32)
    labels = rng.integers(0, 20, 4)
    total, count = ops.cross_entropy(logits, labels, label_smoothing=0.1)
    assert np.isfinite(float(total))
    _close(total, cross_entropy_ref(logits, labels, label_smoothing=0.1)[0])
    assert float(count) == 4.0
    xb = _bf16(3.0 * rng.standard_normal((4, 20)))
    total, _ = ops.cross_entropy(xb, labels, z_loss=1e-3)
    assert total.dtype == jnp.float32
    _close(total, cross_entropy_ref(_as_f32(xb), labels, z_loss=1e-3)[0])


def test_cross_entropy_rejects_bad_shapes_and_smoothing(ce_inputs):
    logits, labels, weights = ce_inputs
    with pytest.raises(ValueError, match=r"labels.shape \+ \(V,\)"):
        ops.cross_entropy(logits, labels[:, :4])
    with pytest.raises(ValueError, match=r"must have the labels' shape"):
        ops.cross_entropy(logits, labels, weights[:, :4])
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
        ops.cross_entropy(logits, labels, label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"must have the labels' shape"):
        ops.accuracy(logits, labels, weights[0])


def test_accuracy_matches_twin(ce_inputs):
    logits, labels, weights = ce_inputs
    labels = labels.copy()
    labels[0, :3] = np.argmax(logits[0, :3], -1)  # some hits for sure
    for w in (None, weights):
        correct, count = ops.accuracy(logits, labels, w)
        ref_correct, ref_count = accuracy_ref(logits, labels, w)
        assert ref_correct > 0
        _close(correct, ref_correct)
        _close(count, ref_count)


def test_kl_divergence(ce_inputs):
    logits, _, weights = ce_inputs
    rng = np.random.default_rng(7)
    other = (logits + rng.standard_normal(logits.shape)).astype(np.float32)
    total, count = ops.kl_divergence(logits, logits)
    assert float(total) == 0.0 and float(count) == 10.0
    for temperature in (1.0, 2.0, 0.5):
        for w in (None, weights):
            total, count = ops.kl_divergence(logits, other, w, temperature=temperature)
            ref_total, ref_count = kl_divergence_ref(logits, other, w, temperature)
            assert ref_total > 0
            _close(total, ref_total)
            _close(count, ref_count)
    # KL is not symmetric: the arguments are (teacher p, student q).
    forward = kl_divergence_ref(logits, other)[0]
    assert abs(float(ops.kl_divergence(other, logits)[0]) - forward) > 1e-3
    with pytest.raises(ValueError, match=r"differ"):
        ops.kl_divergence(logits, other[..., :5])


# ---------------------------------------------------------------------------- dropout


def test_dropout_identity_without_key_or_rate():
    x = jnp.arange(1.0, 7.0)
    assert ops.dropout(x, 0.5, None) is x
    assert ops.dropout(x, 0.0, jax.random.key(0)) is x


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_statistics_and_scaling(rate):
    n = 100_000
    x = np.random.default_rng(8).uniform(0.5, 1.5, n).astype(np.float32)  # no zeros
    out = np.asarray(ops.dropout(x, rate, jax.random.key(1)))
    keep = out != 0
    sigma = np.sqrt(rate * (1 - rate) / n)
    assert abs(keep.mean() - (1 - rate)) < 5 * sigma, keep.mean()
    _close(out, dropout_ref(x, rate, keep))
    # Same key, same mask; another key, another mask.
    np.testing.assert_array_equal(np.asarray(ops.dropout(x, rate, jax.random.key(1))), out)
    assert (np.asarray(ops.dropout(x, rate, jax.random.key(2))) != out).any()


def test_dropout_bf16_keeps_dtype():
    x = _bf16(np.ones((64, 64)))
    out = ops.dropout(x, 0.5, jax.random.key(3))
    assert out.dtype == jnp.bfloat16
    assert set(np.unique(_as_f32(out))) == {0.0, 2.0}


@pytest.mark.parametrize("rate", [1.0, 1.5, -0.1])
def test_dropout_rejects_bad_rate(rate):
    x = jnp.ones(4)
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        ops.dropout(x, rate, jax.random.key(0))
    # Also in eval mode (no key), so a bad config fails before training starts.
    with pytest.raises(ValueError, match=r"dropout rate must be in \[0, 1\)"):
        ops.dropout(x, rate, None)
