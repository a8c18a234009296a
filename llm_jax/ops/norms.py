"""Normalisation layers as functions: LayerNorm and RMSNorm, float32 inside, cast back.

Shape letters: D the normalised (last) dim; "..." any leading dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def layer_norm(
    x: Float[Array, "... D"],
    scale: Float[Array, " D"] | None,
    bias: Float[Array, " D"] | None = None,
    *,
    eps: float = 1e-5,
) -> Float[Array, "... D"]:
    """LayerNorm (Ba et al. 2016): (x - mean) / sqrt(var + eps) * scale + bias.

    Statistics over the last axis in float32; the result is cast back to x's dtype. `bias`
    may be None (LayerNorm without bias), `scale` None for no learned gain.
    """
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def rms_norm(
    x: Float[Array, "... D"],
    scale: Float[Array, " D"] | None,
    *,
    eps: float = 1e-6,
    scale_offset: float = 0.0,
) -> Float[Array, "... D"]:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * (scale_offset + scale).

    No mean subtraction and no bias. This is also T5's "LayerNorm" (T5 uses eps=1e-6 and
    scale_offset=0); Gemma-style checkpoints store scale - 1 and use scale_offset=1.
    Computed in float32, cast back to x's dtype.
    """
    xf = x.astype(jnp.float32)
    ms = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
    y = xf * jax.lax.rsqrt(ms + eps)
    if scale is not None:
        y = y * (scale_offset + scale.astype(jnp.float32))
    return y.astype(x.dtype)


def t5_layer_norm(
    x: Float[Array, "... D"], scale: Float[Array, " D"], *, eps: float = 1e-6
) -> Float[Array, "... D"]:
    """T5's variant: RMSNorm with eps 1e-6 and no offset (kept as a name for readers of T5)."""
    return rms_norm(x, scale, eps=eps)
