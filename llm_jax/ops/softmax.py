"""Softmax, log-softmax and log-sum-exp: the one home of the normaliser, in float32.

    softmax(x)_v     = exp(x_v - m) / sum_u exp(x_u - m)
    log_softmax(x)_v = (x_v - m) - log sum_u exp(x_u - m)
    logsumexp(x)     = m + log sum_u exp(x_u - m)
with m = max_u x_u, subtracted so that exp never overflows. Every function reads any float
dtype and computes and returns float32: bfloat16 has 8 mantissa bits, too few to resolve
the differences between nearby logits; callers cast back where they need a narrower dtype.

Shape letters: "..." any leading dims, V the reduced axis (vocabulary, keys).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def softmax(x: Float[Array, "... V"], axis: int = -1) -> Float[Array, "... V"]:
    """Probabilities exp(x_v - m) / sum_u exp(x_u - m) along `axis`, in float32.

    Args:
      x: logits of any float dtype; the result sums to 1 along `axis`.
      axis: the axis to normalise over.

    Returns:
      float32 array of x's shape.
    """
    x = x.astype(jnp.float32)
    # The max is a constant shift: the gradient need not flow through it.
    unnormalized = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True)))
    return unnormalized / jnp.sum(unnormalized, axis=axis, keepdims=True)


def log_softmax(x: Float[Array, "... V"], axis: int = -1) -> Float[Array, "... V"]:
    """Log-probabilities (x_v - m) - log sum_u exp(x_u - m) along `axis`, in float32.

    Args:
      x: logits of any float dtype.
      axis: the axis to normalise over.

    Returns:
      float32 array of x's shape, every entry <= 0.
    """
    shifted = x.astype(jnp.float32)
    shifted = shifted - jax.lax.stop_gradient(jnp.max(shifted, axis=axis, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


def logsumexp(x: Float[Array, "... V"], axis: int = -1) -> Float[Array, "..."]:
    """The normaliser m + log sum_u exp(x_u - m) along `axis` (dropped), in float32.

    A row whose max is not finite (all -inf) shifts by 0 instead, so it gives -inf, not nan.

    Args:
      x: logits of any float dtype.
      axis: the axis to reduce.

    Returns:
      float32 array of x's shape without `axis`.
    """
    x = x.astype(jnp.float32)
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    return jnp.squeeze(jnp.log(jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)) + m, axis)
