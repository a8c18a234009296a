"""Choosing one token from a row of logits: greedy and filtered ancestral sampling.

Filters follow the Hugging Face order and conventions so results are comparable:

    p = softmax(logits / temperature)                      temperature scaling
    keep the top_k largest p (top_k = 0: all)              top-k
    renormalise; sort descending; keep token i while the
    mass of the tokens strictly before it is < top_p       top-p (nucleus), >= 1 token
    sample from the renormalised kept set

Working on the `lax.top_k` candidates (sorted, size k, or V when only top-p is on) keeps
the cost at O(V) for top-k and O(V log V) for top-p, and gives top-p its sort for free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from llm_jax.ops import softmax
from llm_jax.sample.strategies import Greedy, Sample


def greedy_token(logits: Float[Array, "B V"]) -> Int[Array, " B"]:
    """The argmax token of each row (the lowest id on ties)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def filter_logits(
    logits: Float[Array, "B V"], temperature: float, top_k: int, top_p: float
) -> tuple[Float[Array, "B C"], Int[Array, "B C"] | None]:
    """Temperature-scaled candidate logits after top-k / top-p, with their token ids.

    Args:
      logits: raw next-token logits [B, V].
      temperature: > 0.
      top_k: 0 (off) or the number of candidates to keep.
      top_p: in (0, 1]; 1 is off.

    Returns:
      (candidates [B, C], ids [B, C]): dropped candidates hold -inf; C = top_k when top_k
      is on, else V. `ids` is None when no filter is on (candidate c is token c).
    """
    scaled = logits.astype(jnp.float32) / temperature  # [B, V]
    vocab = scaled.shape[-1]
    if top_k == 0 and top_p >= 1.0:
        return scaled, None
    # Sorted descending: the top-k set, or the whole vocabulary for top-p's sort.
    values, ids = jax.lax.top_k(scaled, min(top_k, vocab) if top_k else vocab)  # [B, C]
    if top_p < 1.0:
        probs = softmax(values, axis=-1)  # [B, C], renormalised over the top-k set
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, C]
        keep = mass_before < top_p
        keep = keep.at[:, 0].set(True)  # the most likely token always survives
        values = jnp.where(keep, values, -jnp.inf)
    return values, ids.astype(jnp.int32)


def choose_token(
    strategy: Greedy | Sample, logits: Float[Array, "B V"], key: jax.Array | None
) -> Int[Array, " B"]:
    """The next token of every row under a greedy or sampling strategy.

    Args:
      strategy: `Greedy()` or `Sample(...)` (temperature 0 acts as greedy).
      logits: [B, V] float32, with any forbidden token already at -inf.
      key: PRNG key for sampling; unused by greedy.

    Returns:
      [B] int32 token ids.
    """
    if isinstance(strategy, Greedy) or strategy.is_greedy:
        return greedy_token(logits)
    candidates, ids = filter_logits(logits, strategy.temperature, strategy.top_k, strategy.top_p)
    pick = jax.random.categorical(key, candidates, axis=-1)  # [B]
    if ids is None:
        return pick.astype(jnp.int32)
    return jnp.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
