"""Weight-only quantization: the ops against a float64 twin, quantized layers and models,
checkpoints, decoding and the convert CLI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llm_jax as lj
from llm_jax.cli import main
from llm_jax.compress import dequantize, quantize, weight_bytes
from llm_jax.convert import restore_model, save_checkpoint
from llm_jax.convert.hf import params_of
from llm_jax.kernels import qmatmul
from llm_jax.models.layers import Einsum, Quant
from llm_jax.ops import quant as quant_ops
from tests.reference import quant_ref

TINY = dict(
    preset="gpt2-tiny",
    d_model=64,
    num_layers=2,
    num_heads=2,
    d_ff=128,
    vocab_size=256,
    max_position_embeddings=64,
)
TOKENS = jnp.asarray([[3, 17, 200, 5, 9, 255, 0, 42]], jnp.int32)


@pytest.fixture(scope="module")
def tiny():
    return lj.models.build(lj.ModelConfig.from_dict(TINY), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bits,group_size", [(8, 0), (8, 16), (4, 0), (4, 16)])
def test_quantize_matches_the_float64_twin(bits, group_size):
    w = np.random.default_rng(bits + group_size).standard_normal((64, 24)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel keeps scale 1 and dequantizes to exact zeros
    q, scale = quant_ops.quantize(jnp.asarray(w), bits, group_size)
    values = np.asarray(quant_ops.unpack_int4(q) if bits == 4 else q, np.float64)
    ref_q, ref_scale = quant_ref.quantize(w, bits, group_size)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-5)
    # Away from a rounding tie (float32 vs float64 may break those differently) the
    # integers agree exactly.
    ratio = w / np.repeat(ref_scale, 64 // ref_scale.shape[0], axis=0)
    clear = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) > 1e-3
    np.testing.assert_array_equal(values[clear], ref_q[clear])
    # Round trip: every weight within half a step of its group's scale.
    back = np.asarray(quant_ops.dequantize(q, scale, bits), np.float64)
    np.testing.assert_allclose(back, quant_ref.dequantize(values, ref_scale), rtol=1e-5, atol=1e-7)
    step = np.repeat(ref_scale, 64 // ref_scale.shape[0], axis=0)
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5))
    assert np.all(back[:, 3] == 0.0)


def test_int4_packing_round_trips_every_value():
    values = jnp.asarray(np.arange(-8, 8).repeat(2).reshape(16, 2) % 16 - 8, jnp.int8)
    packed = quant_ops.pack_int4(values)
    assert packed.shape == (8, 2) and packed.dtype == jnp.int8
    np.testing.assert_array_equal(quant_ops.unpack_int4(packed), values)


@pytest.mark.parametrize("bits,group_size", [(8, 0), (4, 16)])
def test_quantized_einsum_is_the_product_with_the_dequantized_kernel(bits, group_size):
    """A multi-axis contraction ('BTNH,NHD->BTD'): output = x . dequantized kernel (twin),
    and |y - y_float| <= sum_i |x_i| * scale_i / 2 per output (the rounding bound)."""
    rngs = nnx.Rngs(0)
    kw = dict(std=0.5, rngs=rngs)
    dense = Einsum("BTNH,NHD->BTD", (4, 8, 16), ("heads", "kv", "embed"), **kw)
    quant = Einsum(
        "BTNH,NHD->BTD", (4, 8, 16), ("heads", "kv", "embed"), quant=Quant(bits, group_size), **kw
    )
    w = dense.kernel[...].reshape(32, 16)
    q, scale = quant_ops.quantize(w, bits, group_size)
    quant.kernel[...], quant.scale[...] = q, scale
    x = jax.random.normal(jax.random.key(1), (2, 3, 4, 8))
    y = np.asarray(quant(x), np.float64)
    values = np.asarray(quant_ops.unpack_int4(q) if bits == 4 else q, np.float64)
    w_ref = quant_ref.dequantize(values, np.asarray(scale, np.float64))  # [I, D]
    x_flat = np.asarray(x, np.float64).reshape(2, 3, 32)
    np.testing.assert_allclose(y, x_flat @ w_ref, rtol=1e-5, atol=1e-5)
    steps = np.repeat(np.asarray(scale, np.float64), 32 // scale.shape[0], axis=0)
    bound = np.abs(x_flat) @ (steps / 2)
    y_float = np.asarray(dense(x), np.float64)
    assert np.all(np.abs(y - y_float) <= bound * (1 + 1e-4) + 1e-5)


def test_quantized_model_is_smaller_and_close_to_float(tiny):
    ref = np.asarray(tiny(TOKENS))
    int8, int4 = quantize(tiny, bits=8), quantize(tiny, bits=4, group_size=32)
    params = params_of(int8)
    assert params["embed"]["embedding"].dtype == jnp.int8
    assert params["embed"]["embedding"].shape == (64, 256)  # [E, V]
    assert params["layers"]["blocks"]["mlp"]["wi"]["kernel"].dtype == jnp.int8
    assert params_of(int4)["layers"]["blocks"]["mlp"]["wi"]["kernel"].shape == (2, 32, 128)
    assert params_of(int4)["layers"]["blocks"]["mlp"]["wi"]["scale"].shape == (2, 2, 128)
    assert weight_bytes(int8) < 0.4 * weight_bytes(tiny)
    assert weight_bytes(int4) < 0.75 * weight_bytes(int8)  # position table, norms stay fp32
    # Stated bounds for this random model: int8 logits within 2% and int4 (g32) within 20%
    # of the largest float logit; the float model itself is untouched.
    scale = np.abs(ref).max()
    assert np.abs(np.asarray(int8(TOKENS)) - ref).max() <= 0.02 * scale
    assert np.abs(np.asarray(int4(TOKENS)) - ref).max() <= 0.2 * scale
    assert tiny.cfg.quant_bits == 0 and tiny.embed.embedding[...].dtype == jnp.float32
    # Dequantizing gives the float model that computes exactly what the quantized one does.
    back = dequantize(int4)
    assert back.cfg.quant_bits == 0
    np.testing.assert_allclose(back(TOKENS), int4(TOKENS), rtol=1e-5, atol=1e-6)


def test_quantized_checkpoint_reloads_bit_identically(tiny, tmp_path):
    model = quantize(tiny, bits=4, group_size=16)
    save_checkpoint(model, tmp_path / "q")
    loaded = restore_model(tmp_path / "q")
    assert loaded.config["model"]["quant_bits"] == 4
    assert loaded.config["model"]["quant_group_size"] == 16
    want, got = params_of(model), params_of(loaded.model)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.model(TOKENS), model(TOKENS))


def test_generate_on_a_quantized_model_is_its_greedy_argmax(tiny):
    model = quantize(tiny, bits=8)
    out = lj.sample.generate(model, TOKENS, max_new_tokens=4)
    # Full causal forwards over one fixed-length buffer (one compile): position p's logits
    # see only tokens <= p, so the zeros after it do not matter.
    forward = nnx.jit(lambda m, seq: m(seq))
    seq = jnp.zeros((1, 12), jnp.int32).at[:, :8].set(TOKENS)
    for p in range(8, 12):
        seq = seq.at[0, p].set(jnp.argmax(forward(model, seq)[0, p - 1]))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(seq[:, 8:]))


def test_bad_settings_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match=r"bits=3.*use bits=8"):
        quantize(tiny, bits=3)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        quantize(tiny, bits=4, group_size=48)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(tiny, bits=8), bits=4)
    with pytest.raises(ValueError, match="quant_bits"):
        lj.ModelConfig.from_dict({**TINY, "quant_bits": 5})
    with pytest.raises(ValueError, match="LoRA"):
        lj.ModelConfig.from_dict({**TINY, "quant_bits": 8, "lora_rank": 4})


def test_convert_cli_writes_a_quantized_checkpoint(tiny, tmp_path, capsys):
    save_checkpoint(tiny, tmp_path / "float")
    args = ["convert", "--from-checkpoint", str(tmp_path / "float"), "--to", str(tmp_path / "q")]
    assert main([*args, "--quantize", "int4", "--group-size", "32"]) == 0
    loaded = restore_model(tmp_path / "q")
    assert (loaded.model.cfg.quant_bits, loaded.model.cfg.quant_group_size) == (4, 32)
    np.testing.assert_array_equal(loaded.model(TOKENS), quantize(tiny, 4, 32)(TOKENS))
    assert main([*args[:3], "--to-hf", str(tmp_path / "hf"), "--quantize", "int8"]) != 0
    assert "--quantize writes our checkpoint" in capsys.readouterr().err


def test_convert_cli_gptq_is_the_librarys_gptq_on_the_texts_windows(tmp_path, capsys):
    from llm_jax.data.tokenizer import train_tokenizer

    text = tmp_path / "calib.txt"
    text.write_text(
        "".join(f"line {i}: the quick brown fox, {i * 7 % 13} jumps.\n" for i in range(300))
    )
    tok = train_tokenizer(text, model_type="char", vocab_size=None, num_sentinels=0)
    cfg = lj.ModelConfig.from_dict({**TINY, "vocab_size": tok.vocab_size})
    model = lj.models.build(cfg, rngs=nnx.Rngs(0))
    save_checkpoint(model, tmp_path / "float", tokenizer=tok)
    args = ["convert", "--from-checkpoint", str(tmp_path / "float"), "--to", str(tmp_path / "q")]
    gptq_args = ["--quantize", "int4", "--group-size", "32", "--embed-bits", "8"]
    assert main([*args, *gptq_args, "--gptq", str(text), "--calib-windows", "4"]) == 0
    loaded = restore_model(tmp_path / "q")
    windows = lj.compress.text_windows(tok, text, 4, 64)  # TINY's 64 positions
    want = lj.compress.gptq(model, windows, 4, 32, embed_bits=8)
    np.testing.assert_array_equal(loaded.model(TOKENS), want(TOKENS))
    assert (loaded.model.cfg.quant_bits, loaded.model.cfg.quant_embed_bits) == (4, 8)
    # Bad input, each before any work.
    assert main([*args, "--gptq", str(text)]) != 0
    assert "--gptq applies only with --quantize" in capsys.readouterr().err
    assert main([*args, *gptq_args, "--gptq", str(tmp_path / "none.txt")]) != 0
    assert "no such text file" in capsys.readouterr().err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 400)
    assert main([*args, *gptq_args, "--gptq", str(latin)]) != 0
    assert "is not UTF-8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fewer than one window"):
        lj.compress.text_windows(tok, text, 4, 100_000)


def _kernel_or_skip():
    if not qmatmul.available():
        pytest.skip("no C++ compiler for the quantized matmul kernel")


def _kernel_calls(fn, *args) -> int:
    text = jax.jit(fn).lower(*args).compile().as_text()
    return text.count(f'custom_call_target="{qmatmul.TARGET}"')


# M rows; I inputs (group remainders below the kernel's 8-row step); O outputs (not a
# multiple of 8, so vector and scalar columns both run); bits; group size. The last three
# are big enough for the kernel's threads: row slices added up per channel and per group,
# and (M = 32) two column chunks of two slices each.
@pytest.mark.parametrize(
    "m,i,o,bits,group_size",
    [
        (1, 64, 200, 8, 0),
        (3, 40, 131, 8, 20),
        (8, 48, 72, 4, 0),
        (5, 60, 3, 4, 12),
        (1, 524, 200, 8, 0),
        (3, 520, 70, 4, 40),
        (32, 16, 1100, 8, 0),
    ],
)
def test_quantized_matmul_kernel_matches_the_float64_twin(m, i, o, bits, group_size):
    _kernel_or_skip()
    rng = np.random.default_rng(m + i + o)
    w = rng.standard_normal((i, o)).astype(np.float32)
    x = rng.standard_normal((m, i)).astype(np.float32)
    q, scale = quant_ops.quantize(jnp.asarray(w), bits, group_size)
    fn = lambda x, q, s: qmatmul.matmul(x, q, s, bits)  # noqa: E731
    assert _kernel_calls(fn, x, q, scale) == 1  # the kernel, not XLA's dequantize + dot
    y = np.asarray(jax.jit(fn)(x, q, scale), np.float64)
    values = np.asarray(quant_ops.unpack_int4(q) if bits == 4 else q, np.float64)
    want = quant_ref.matmul(x, values, np.asarray(scale, np.float64))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# M rows (pairs and an odd one); I inputs (a tail below the 8-lane step); O outputs (a tail
# below the 4-row block); the last two big enough for the crew's threads.
@pytest.mark.parametrize(
    "m,i,o", [(2, 64, 200), (3, 43, 7), (5, 8, 1), (9, 300, 1030), (16, 96, 513)]
)
def test_float_matmul_kernel_matches_the_float64_twin(m, i, o):
    _kernel_or_skip()
    rng = np.random.default_rng(m + i + o)
    w = rng.standard_normal((o, i)).astype(np.float32)  # output-major
    x = rng.standard_normal((m, i)).astype(np.float32)
    text = jax.jit(qmatmul.float_matmul).lower(x, w).compile().as_text()
    assert text.count(f'custom_call_target="{qmatmul.F_TARGET}"') == 1
    y = np.asarray(jax.jit(qmatmul.float_matmul)(x, w), np.float64)
    want = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # One row (XLA's own matvec is as fast) and more than 16 rows (XLA's GEMM) skip it.
    for rows in (1, 17):
        text = jax.jit(qmatmul.float_matmul).lower(np.ones((rows, i), np.float32), w)
        assert qmatmul.F_TARGET not in text.compile().as_text()


def test_float_matmul_kernel_gradient_is_the_dots():
    _kernel_or_skip()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((10, 24)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((3, 10)), jnp.float32)
    got = jax.grad(lambda x, w: jnp.sum(qmatmul.float_matmul(x, w) * cot), (0, 1))(x, w)
    np.testing.assert_allclose(got[0], np.asarray(cot, np.float64) @ np.asarray(w), rtol=1e-5)
    np.testing.assert_allclose(got[1], np.asarray(cot, np.float64).T @ np.asarray(x), rtol=1e-5)


def test_quantized_matmul_kernel_under_vmap_grad_and_scan():
    _kernel_or_skip()
    rng = np.random.default_rng(0)
    q, s = quant_ops.quantize(jnp.asarray(rng.standard_normal((32, 16)), jnp.float32), 4, 16)
    xs = jnp.asarray(rng.standard_normal((3, 2, 32)), jnp.float32)
    kernel = lambda x, s: qmatmul.matmul(x, q, s, 4)  # noqa: E731
    ref = lambda x, s: qmatmul.reference(x, q, s, 4)  # noqa: E731
    want = jax.vmap(ref, (0, None))(xs, s)
    # Two float32 sums in different orders: relative 1e-5 plus 1e-6 of the largest value.
    tol = dict(rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
    np.testing.assert_allclose(jax.jit(jax.vmap(kernel, (0, None)))(xs, s), want, **tol)
    scanned = jax.lax.scan(lambda c, x: (c + kernel(x, s).sum(), None), 0.0, xs)[0]
    np.testing.assert_allclose(scanned, want.sum(), rtol=1e-5, atol=tol["atol"])
    # A linear loss: its gradient does not depend on the (order-sensitive) forward values.
    cot = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    loss = lambda f: lambda x, s: jnp.sum(f(x, s) * cot)  # noqa: E731
    got, expected = jax.grad(loss(kernel), (0, 1))(xs[0], s), jax.grad(loss(ref), (0, 1))(xs[0], s)
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_dispatch_decode_rows_only_and_same_logits(tiny, monkeypatch):
    """Decode-sized inputs take the kernel (every dense layer and the tied head), larger
    ones XLA's dot; the model's logits are the same either way."""
    _kernel_or_skip()
    model = quantize(tiny, bits=8)
    step = lambda m, t: m(t)  # noqa: E731
    # q, k, v, out, wi, wo in each of the 2 layers (unrolled on CPU) + the tied head.
    n_dense = 6 * tiny.cfg.num_layers + 1
    assert _kernel_calls(nnx.jit(step), model, TOKENS) == n_dense
    long = jnp.zeros((1, qmatmul.MAX_ROWS + 1), jnp.int32)
    assert _kernel_calls(nnx.jit(step), model, long) == 0
    with_kernel = np.asarray(model(TOKENS))
    monkeypatch.setattr(qmatmul, "MAX_ROWS", 0)
    np.testing.assert_allclose(with_kernel, model(TOKENS), rtol=1e-5, atol=1e-5)
    assert qmatmul.einsum("BTD,ND->BTN", TOKENS, None, None, 8) is None  # kernel axes trail


def test_int4_kernels_with_an_int8_embedding(tiny, tmp_path):
    model = quantize(tiny, bits=4, group_size=32, embed_bits=8)
    params = params_of(model)
    assert params["embed"]["embedding"].shape == (64, 256)  # int8 [E, V], not packed
    assert params["embed"]["scale"].shape == (1, 256)  # one scale per token
    assert params["layers"]["blocks"]["mlp"]["wi"]["kernel"].shape == (2, 32, 128)  # int4
    # The embedding's rows equal those of the all-int8 model.
    int8 = quantize(tiny, bits=8)
    np.testing.assert_array_equal(
        params["embed"]["embedding"], params_of(int8)["embed"]["embedding"]
    )
    ref = np.asarray(tiny(TOKENS))
    assert np.abs(np.asarray(model(TOKENS)) - ref).max() <= 0.2 * np.abs(ref).max()
    save_checkpoint(model, tmp_path / "q")
    loaded = restore_model(tmp_path / "q")
    assert loaded.model.cfg.quant_embed_bits == 8
    np.testing.assert_array_equal(loaded.model(TOKENS), model(TOKENS))
    back = dequantize(model)
    assert back.cfg.quant_embed_bits == 0
    np.testing.assert_allclose(back(TOKENS), model(TOKENS), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="embed_bits=4"):
        quantize(tiny, bits=4, embed_bits=4)
