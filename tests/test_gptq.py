"""GPTQ: the core against its float64 twin, its defining property (a smaller layer output
error than round-to-nearest on correlated inputs), the whole-model format, checkpoints and
errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llm_jax as lj
from llm_jax.compress import gptq, gptq_kernel, quantize
from llm_jax.convert import restore_model, save_checkpoint
from llm_jax.convert.hf import params_of
from llm_jax.ops import quant as quant_ops
from tests.reference import gptq_ref

TINY = dict(
    preset="gpt2-tiny",
    d_model=64,
    num_layers=2,
    num_heads=2,
    d_ff=64,  # every block kernel [64, 64]: one GPTQ compile
    vocab_size=256,
    max_position_embeddings=64,
    tie_embeddings=False,  # an untied head: GPTQ quantizes it too
)
CALIB = np.random.default_rng(0).integers(0, 256, (6, 32)).astype(np.int32)


@pytest.fixture(scope="module")
def tiny():
    return lj.models.build(lj.ModelConfig.from_dict(TINY), rngs=nnx.Rngs(0))


def _correlated(i: int, seed: int, rows: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Inputs X [rows * I, I] with strongly correlated features (and input 5 never active),
    and a kernel W [I, 24]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows * i, i)) @ (0.5 * rng.standard_normal((i, i)) + np.eye(i))
    x[:, 5] = 0.0
    return x, rng.standard_normal((i, 24)).astype(np.float32)


def _dequantized(q, scale, bits) -> np.ndarray:
    stored = quant_ops.pack_int4(q) if bits == 4 else q
    return np.asarray(quant_ops.dequantize(stored, scale, bits), np.float64)


# (I, bits, group): per channel, groups inside a lazy-update block, and groups spanning
# two lazy-update blocks (group 256 > block 128).
@pytest.mark.parametrize("i,bits,group", [(64, 8, 0), (64, 4, 0), (64, 4, 16), (256, 4, 256)])
def test_gptq_kernel_matches_the_float64_twin(i, bits, group):
    x, w = _correlated(i, seed=i + bits + group)
    h = x.T @ x
    q, scale = gptq_kernel(jnp.asarray(w), h, bits, group)
    ref_q, ref_scale = gptq_ref.gptq(w, h, bits, group)
    assert q.dtype == jnp.int8 and scale.shape == ref_scale.shape
    np.testing.assert_array_equal(np.asarray(q, np.float64), ref_q)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-5)
    assert np.all(np.asarray(q)[5] == 0)  # a dead input's weights are dropped


@pytest.mark.parametrize("bits,group", [(4, 16), (4, 0), (8, 0)])
def test_gptq_layer_output_error_is_below_round_to_nearest(bits, group):
    """Fitted on half of the correlated inputs, measured on the other (held-out) half."""
    x, w = _correlated(64, seed=bits + group, rows=16)
    fit, held_out = x[: len(x) // 2], x[len(x) // 2 :]
    q, scale = gptq_kernel(jnp.asarray(w), fit.T @ fit, bits, group)
    rtn = np.asarray(quant_ops.dequantize(*quant_ops.quantize(jnp.asarray(w), bits, group), bits))
    err_gptq = np.linalg.norm(held_out @ (w - _dequantized(q, scale, bits)))
    err_rtn = np.linalg.norm(held_out @ (w - rtn))
    assert err_gptq < 0.8 * err_rtn


def test_gptq_model_has_the_quantize_format_and_reloads_bit_identically(tiny, tmp_path):
    # Through quantize's method="gptq", in two forward batches of 3 calibration rows.
    model = quantize(tiny, 4, 16, method="gptq", calibration=CALIB, batch_size=3)
    rtn = quantize(tiny, bits=4, group_size=16)
    assert model.cfg == rtn.cfg
    got, want = params_of(model), params_of(rtn)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    # The embedding lookup keeps round-to-nearest; the dense kernels (head too) are GPTQ's.
    np.testing.assert_array_equal(got["embed"]["embedding"], want["embed"]["embedding"])
    for path in (("layers", "blocks", "mlp", "wo"), ("lm_head",)):
        a, b = got, want
        for key in path:
            a, b = a[key], b[key]
        assert not np.array_equal(a["kernel"], b["kernel"])
    save_checkpoint(model, tmp_path / "q")
    loaded = restore_model(tmp_path / "q").model
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params_of(loaded)), strict=True):
        np.testing.assert_array_equal(a, b)
    forward = nnx.jit(lambda m, tokens: m(tokens))  # one compile for the three int4 models
    tokens = jnp.asarray(CALIB)
    np.testing.assert_array_equal(forward(loaded, tokens), forward(model, tokens))
    # Closer to the float model than round-to-nearest on the calibration text.
    ref = np.asarray(forward(tiny, tokens))
    err = lambda m: np.mean((np.asarray(forward(m, tokens)) - ref) ** 2)  # noqa: E731
    assert err(model) < err(rtn)


def test_gptq_bad_input_raises_before_any_work(tiny):
    cases = [
        (None, "needs calibration data"),
        (np.zeros((0, 8), np.int32), "no token windows"),
        (CALIB.astype(np.float32), "integer token ids"),
        (CALIB + 200, r"span \[200, 455\].*vocabulary is \[0, 256\)"),
        (-CALIB, r"span \[-2\d\d, 0\]"),
        (np.zeros((2, 65), np.int32), "exceed the model's 64 positions"),
        ([[1, 2, 3], [4, 5]], "differ in length"),
    ]
    for calibration, message in cases:
        with pytest.raises(ValueError, match=message):
            gptq(tiny, calibration)
    with pytest.raises(ValueError, match=r"bits=3.*use bits=8"):
        gptq(tiny, CALIB, bits=3)
    with pytest.raises(ValueError, match="percdamp > 0"):
        gptq(tiny, CALIB, percdamp=0.0)
    with pytest.raises(ValueError, match="already quantized"):
        gptq(quantize(tiny, bits=8), CALIB)
    with pytest.raises(ValueError, match=r"method='awq'.*'gptq'"):
        quantize(tiny, bits=4, method="awq")
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize(tiny, bits=4, method="gptq")
    with pytest.raises(ValueError, match="only used by method='gptq'"):
        quantize(tiny, bits=4, calibration=CALIB)
    bert = lj.models.build(lj.ModelConfig.from_dict(dict(preset="bert-tiny")), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="GPT models"):
        gptq(bert, CALIB)
