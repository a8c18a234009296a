"""Symmetric weight-only quantization: int8 and packed int4 with per-group scales.

A weight is quantized in its kernel layout [I, O...]: I is the (flattened) input axis the
layer contracts, O... the output axes. The I inputs of each output channel are cut into
G = I / group_size groups; each group has one scale s = max|w| / qmax (qmax 127 for int8,
7 for int4) and stores q = round(w / s) clipped to [-qmax, qmax]. group_size = 0 means one
group spanning the whole input: the per-output-channel scheme. int4 values are packed two
per int8 byte along I (input 2i in the low nibble, 2i+1 in the high one), so a packed
kernel is [I / 2, O...]. Dequantizing is q * s, in the compute dtype.

Shape letters: I input features, O output features (any number of axes), G groups.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int8

QMAX = {8: 127, 4: 7}


def num_groups(num_inputs: int, bits: int, group_size: int) -> int:
    """G, the groups of `num_inputs` inputs; ValueError naming the fix when they do not fit.

    Args:
      num_inputs: I, the flattened input size of the kernel.
      bits: 8 or 4.
      group_size: inputs per scale; 0 for one group (per output channel).
    """
    if bits not in QMAX:
        raise ValueError(f"quantization bits={bits!r} is not supported; use 8 (int8) or 4 (int4).")
    if group_size < 0:
        raise ValueError(f"group_size={group_size} must be >= 0 (0: one scale per channel).")
    if bits == 4 and num_inputs % 2:
        raise ValueError(
            f"int4 packs two inputs per byte, but a kernel has an odd input size {num_inputs}; "
            "use bits=8 for this model."
        )
    if group_size == 0:
        return 1
    if num_inputs % group_size or (bits == 4 and group_size % 2):
        raise ValueError(
            f"group_size={group_size} does not divide a kernel's input size {num_inputs}"
            + (" into even groups" if bits == 4 else "")
            + "; choose a divisor of it (e.g. 32, 64) or 0 for one scale per output channel."
        )
    return num_inputs // group_size


def pack_int4(q: Int8[Array, "I ..."]) -> Int8[Array, "I/2 ..."]:
    """Two int4 values (in [-8, 7]) per byte: row 2i in the low nibble, 2i+1 in the high."""
    low, high = q[0::2], q[1::2]
    return ((high.astype(jnp.int8) << 4) | (low.astype(jnp.int8) & 0x0F)).astype(jnp.int8)


def unpack_int4(packed: Int8[Array, "I/2 ..."]) -> Int8[Array, "I ..."]:
    """The inverse of `pack_int4`; arithmetic shifts restore each nibble's sign."""
    low = (packed << 4) >> 4
    high = packed >> 4
    # [I/2, 2, O...] -> [I, O...]: rows interleave as 0, 1, 2, ...
    return jnp.stack([low, high], axis=1).reshape(-1, *packed.shape[1:])


def quantize(
    w: Float[Array, "I ..."], bits: int, group_size: int = 0, scale_dtype=jnp.float32
) -> tuple[Int8[Array, "Ip ..."], Float[Array, "G ..."]]:
    """Quantize a kernel [I, O...] symmetrically.

    Args:
      w: the float kernel, input axis first.
      bits: 8 or 4.
      group_size: inputs per scale (must divide I); 0: one scale per output channel.
      scale_dtype: the stored scale's dtype; q is rounded against the stored scale, so
        dequantizing reproduces the rounding exactly.

    Returns:
      (q, scale): q int8 [I, O...] (bits 8) or packed [I/2, O...] (bits 4); scale [G, O...].
    """
    i, out = w.shape[0], w.shape[1:]
    g = num_groups(i, bits, group_size)
    qmax = QMAX[bits]
    grouped = w.astype(jnp.float32).reshape(g, i // g, *out)  # [G, I/G, O...]
    amax = jnp.max(jnp.abs(grouped), axis=1)  # [G, O...]
    # An all-zero group keeps scale 1 (any scale dequantizes its zeros exactly).
    scale = jnp.where(amax > 0, amax / qmax, 1.0).astype(scale_dtype)
    q = jnp.round(grouped / scale.astype(jnp.float32)[:, None])
    q = jnp.clip(q, -qmax, qmax).astype(jnp.int8).reshape(i, *out)
    return (pack_int4(q) if bits == 4 else q), scale


def dequantize(
    q: Int8[Array, "Ip ..."], scale: Float[Array, "G ..."], bits: int, dtype=jnp.float32
) -> Float[Array, "I ..."]:
    """The kernel [I, O...] in `dtype` from `quantize`'s (q, scale)."""
    values = unpack_int4(q) if bits == 4 else q  # [I, O...]
    i, out, g = values.shape[0], values.shape[1:], scale.shape[0]
    grouped = values.reshape(g, i // g, *out).astype(dtype)  # [G, I/G, O...]
    return (grouped * scale.astype(dtype)[:, None]).reshape(i, *out)
