"""What every model does to its inputs first: checks, the token embedding, dropout keys.

Shape letters: B batch, T length, D (or E) embedding width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

if TYPE_CHECKING:
    from llm_jax.models.layers import Embed


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_tokens(tokens, vocab_size: int, *, name: str = "tokens") -> None:
    """Validate a [B, T] integer token array before any device work.

    Raises ValueError for a wrong rank or dtype and for ids outside [0, vocab_size). Traced
    arrays (inside `jit`) cannot be inspected and are skipped: check before compiling.
    """
    if tokens.ndim != 2:
        raise ValueError(
            f"{name} must be rank 2 [batch, length]; got shape {tuple(tokens.shape)}. "
            f"Add a batch axis with tokens[None] for a single sequence."
        )
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids; got dtype {tokens.dtype}.")
    if is_traced(tokens) or tokens.size == 0:
        return
    arr = np.asarray(tokens)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{name} contain ids in [{lo}, {hi}] but the vocabulary has {vocab_size} entries "
            f"(valid ids 0..{vocab_size - 1}); check that the tokenizer matches the model's "
            f"vocab_size."
        )


def check_length(length: int, max_positions: int, *, name: str = "tokens") -> None:
    """ValueError naming the fix unless `length` tokens fit `max_positions` positions."""
    if length > max_positions:
        raise ValueError(
            f"{name} have length {length} but the model has {max_positions} positions; "
            f"truncate the input to {max_positions} tokens or raise max_position_embeddings."
        )


def default_positions(batch: int, length: int, offset=0) -> Int[Array, "B T"]:
    """Positions offset, offset + 1, ... for every row."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None] + offset, (batch, length))


def embed_inputs(
    embed: Embed,
    tokens: Int[Array, "B T"] | None,
    inputs_embeds: Float[Array, "B T D"] | None,
    *,
    dtype,
    width: str = "D",
) -> Float[Array, "B T D"]:
    """The token embeddings of `tokens` (checked against the table), or `inputs_embeds`.

    Args:
      embed: the token embedding table [V, D].
      tokens: token ids [B, T]; or None when the caller passes `inputs_embeds`.
      inputs_embeds: [B, T, D] embeddings given directly (soft prompts).
      dtype: the compute dtype `inputs_embeds` is cast to.
      width: the letter of the embedding width in the error message ("D", or "E").

    Returns:
      [B, T, D] embeddings in the compute dtype.
    """
    if inputs_embeds is not None:
        return inputs_embeds.astype(dtype)
    if tokens is None:
        raise ValueError(f"pass tokens [B, T] or inputs_embeds [B, T, {width}].")
    check_tokens(tokens, embed.num_embeddings)
    return embed(tokens)


def split_key(key: jax.Array | None, n: int) -> list[jax.Array | None]:
    """`n` dropout keys from `key`, or `n` Nones when dropout is off (key None)."""
    return [None] * n if key is None else list(jax.random.split(key, n))
