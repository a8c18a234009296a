"""GPTQ: post-training weight quantization with error feedback (Frantar et al. 2022).

Round-to-nearest (`quant.quantize`) rounds every weight on its own. GPTQ quantizes a dense
layer's inputs one at a time and spreads each rounding error over the inputs not yet
quantized, weighted by how the layer's calibration inputs X correlate, so that the
layer's output XW moves as little as possible. With H = X^T X (the paper's 2 X^T X; the
factor cancels) and U the upper Cholesky factor of H^-1, input i's error
e = (w_i - q_i) / U_ii updates w_j -= U_ij e for j > i. A group's scale (max|w| / qmax
over its `group_size` inputs) is computed when GPTQ reaches the group's first input, from
the weights as updated so far; that is the paper's grouping, and it keeps our layout
(inputs in their order, no act-order permutation), so the result is exactly the format
`quantize` writes and the kernels read.

`gptq(model, calibration)` runs the paper's sequential scheme on a GPT: the calibration
tokens go through the blocks one at a time; a block's dense layers are quantized from the
inputs that reach it through the already quantized blocks before it, then the block's
quantized output feeds the next. The token embedding is a lookup, not a product, and
keeps round-to-nearest (`embed_bits` as in `quantize`).

Shape letters: I input features (a kernel's flattened contracted axes), O output
features (flattened), G groups, L layers, B batch, T length.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int8

from llm_jax.compress.quant import _check, _get, _set, quantize
from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.models.layers import Einsum, num_inputs
from llm_jax.ops import quant as quant_ops


def inverse_hessian_factor(h: np.ndarray, percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """U, the upper Cholesky factor of (H + damp I)^-1 (so H^-1 = U^T U), in float64, and
    the mask of dead inputs (never nonzero in the calibration data: diag H = 0).

    Dead inputs get H_ii = 1 (their weights are zeroed by the caller; nothing depends on
    them); the damping is `percdamp` times the mean of diag H, as in the paper.
    """
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
    lower = np.linalg.cholesky(h)
    eye = np.eye(h.shape[0])
    lower_inv = np.linalg.solve(lower, eye)  # H^-1 = L^-T L^-1
    h_inv = lower_inv.T @ lower_inv
    return np.linalg.cholesky(h_inv).T, dead


def _group_scale(w: Float[Array, "g O"], qmax: int, scale_dtype) -> Float[Array, " O"]:
    """max|w| / qmax per output, rounded to the stored dtype (as `ops.quant.quantize`)."""
    amax = jnp.max(jnp.abs(w), axis=0)
    return jnp.where(amax > 0, amax / qmax, 1.0).astype(scale_dtype).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("bits", "group", "block", "scale_dtype"))
def _gptq_loop(w, u, *, bits: int, group: int, block: int, scale_dtype):
    """GPTQ over the inputs of w [I, O] in blocks of `block` inputs (the paper's lazy batch
    updates: a block's errors reach the later inputs in one [I, B] @ [B, O] product).

    Group scales read only inputs that have every earlier error applied: `block` divides
    `group` (a group starts at a block start, after all earlier blocks' updates) or
    `group` divides `block` (the group lies inside the block, which is kept current).
    """
    i_total, o = w.shape
    qmax = quant_ops.QMAX[bits]
    scale = jnp.ones((i_total // group, o), jnp.float32)
    rows = jnp.arange(i_total)

    def one_block(b, carry):
        w, q, scale = carry
        i1 = b * block
        if group > block:  # the group of this block starts here when i1 % group == 0
            s = _group_scale(jax.lax.dynamic_slice_in_dim(w, i1, group), qmax, scale_dtype)
            scale = jnp.where(i1 % group == 0, scale.at[i1 // group].set(s), scale)
        wb = jax.lax.dynamic_slice_in_dim(w, i1, block)  # [B, O]
        ub = jax.lax.dynamic_slice(u, (i1, i1), (block, block))  # [B, B]

        def one_input(j, inner):
            wb, qb, eb, scale = inner
            if group <= block:
                s = _group_scale(jax.lax.dynamic_slice_in_dim(wb, j, group), qmax, scale_dtype)
                scale = jnp.where(j % group == 0, scale.at[(i1 + j) // group].set(s), scale)
            s = scale[(i1 + j) // group]
            qj = jnp.clip(jnp.round(wb[j] / s), -qmax, qmax)
            err = (wb[j] - qj * s) / ub[j, j]  # [O]
            later = jnp.where(jnp.arange(block) > j, ub[j], 0.0)  # [B]
            wb = wb - later[:, None] * err[None, :]
            return wb, qb.at[j].set(qj), eb.at[j].set(err), scale

        zeros = jnp.zeros((block, o), jnp.float32)
        wb, qb, eb, scale = jax.lax.fori_loop(0, block, one_input, (wb, zeros, zeros, scale))
        u_rows = jax.lax.dynamic_slice_in_dim(u, i1, block)  # [B, I]
        update = jnp.where((rows >= i1 + block)[:, None], u_rows.T @ eb, 0.0)  # [I, O]
        w = jax.lax.dynamic_update_slice_in_dim(w - update, wb, i1, axis=0)
        return w, jax.lax.dynamic_update_slice_in_dim(q, qb, i1, axis=0), scale

    init = (w, jnp.zeros_like(w), scale)
    _, q, scale = jax.lax.fori_loop(0, i_total // block, one_block, init)
    return q.astype(jnp.int8), scale


def gptq_kernel(
    w: Float[Array, "I O"],
    h: Float[Array, "I I"],
    bits: int,
    group_size: int = 0,
    *,
    percdamp: float = 0.01,
    scale_dtype=jnp.float32,
) -> tuple[Int8[Array, "I O"], Float[Array, "G O"]]:
    """GPTQ of one kernel w [I, O] given its inputs' Hessian h = X^T X [I, I].

    Args:
      w: the float kernel, input axis first (as `ops.quant.quantize` takes it).
      h: X^T X of the layer's calibration inputs X [tokens, I] (any positive multiple).
      bits: 8 or 4.
      group_size: inputs per scale (must divide I); 0: one scale per output channel.
      percdamp: diagonal damping as a fraction of mean(diag h).
      scale_dtype: the stored scale's dtype; codes are rounded against the stored scale.

    Returns:
      (q, scale): the integer codes int8 [I, O] (unpacked) and scale [G, O] in scale_dtype;
      `ops.quant.pack_int4(q)` is the stored int4 kernel.
    """
    i_total = w.shape[0]
    groups = quant_ops.num_groups(i_total, bits, group_size)
    group = i_total // groups
    # Blocks of at most 128 inputs that nest with the groups (see `_gptq_loop`).
    block = math.gcd(group, 128) if group_size else math.gcd(i_total, 128)
    u, dead = inverse_hessian_factor(np.asarray(h), percdamp)
    w = jnp.where(jnp.asarray(dead)[:, None], 0.0, jnp.asarray(w, jnp.float32))
    q, scale = _gptq_loop(
        w,
        jnp.asarray(u, jnp.float32),
        bits=bits,
        group=group,
        block=block,
        scale_dtype=jnp.dtype(scale_dtype),
    )
    return q, scale.astype(scale_dtype)
