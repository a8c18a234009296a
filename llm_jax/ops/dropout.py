"""Dropout as a pure function of an explicit PRNG key (Srivastava et al. 2014)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def dropout(x: Float[Array, "..."], rate: float, rng: jax.Array | None) -> Float[Array, "..."]:
    """Zero each element with probability `rate` and scale the rest by 1 / (1 - rate).

    The identity when `rng` is None or `rate` is 0: that is how models run in eval mode.
    The rate is checked either way, so a bad config fails in eval as well as in training.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1); got {rate}.")
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)
