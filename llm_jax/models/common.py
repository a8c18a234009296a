"""Pieces every model family shares: input checks, the KV cache, the parameter table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Bool, Int

from llm_jax.ops import causal_mask


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
    if length > max_positions:
        raise ValueError(
            f"{name} have length {length} but the model has {max_positions} positions; "
            f"truncate the input to {max_positions} tokens or raise max_position_embeddings."
        )


def default_positions(batch: int, length: int, offset=0) -> Int[Array, "B T"]:
    """Positions offset, offset + 1, ... for every row."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None] + offset, (batch, length))


@struct.dataclass
class KVCache:
    """A static-size decoding cache for a stack of attention layers.

    Fields:
      layers: per-layer tensors stacked on a leading L axis, head-major (the layout the
        attention products read in place): 'k', 'v' [L, B, K, S, H] for self-attention, and
        for encoder–decoders 'cross_k', 'cross_v' [L, B, K, Se, H].
      valid: [B, S] True on slots that hold a real (non-padding) token.
      index: [] int32, the number of slots written so far (the next write position).
      encoder_valid: [B, Se] True on real encoder tokens (encoder–decoders), else None.
    """

    layers: dict[str, Array]
    valid: Bool[Array, "B S"]
    index: Int[Array, ""]
    encoder_valid: Bool[Array, "B Se"] | None = None

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


# Logical axes of the cache tensors, for sharding decoding on a mesh.
CACHE_AXES = {
    "k": ("layers", "batch", "kv_heads", "cache_seq", "kv"),
    "v": ("layers", "batch", "kv_heads", "cache_seq", "kv"),
    "cross_k": ("layers", "batch", "kv_heads", "cache_seq", "kv"),
    "cross_v": ("layers", "batch", "kv_heads", "cache_seq", "kv"),
    "valid": ("batch", "cache_seq"),
}


def empty_kv(num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype):
    shape = (num_layers, batch, kv_heads, length, head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_step(
    cache: KVCache, q_len: int, segment_ids: Int[Array, "B T"] | None
) -> tuple[Bool[Array, "B 1 T S"], Bool[Array, "B S"]]:
    """The self-attention mask of T new tokens written at `cache.index`, and the new `valid`.

    A new token at slot index + t sees every valid slot s <= index + t; padding tokens
    (segment id 0, e.g. left padding of a batch of prompts) are never valid keys.
    """
    b, s = cache.valid.shape
    new = jnp.ones((b, q_len), bool) if segment_ids is None else segment_ids != 0
    valid = jax.lax.dynamic_update_slice(cache.valid, new, (0, cache.index))
    mask = causal_mask(q_len, s, q_offset=cache.index) & valid[:, None, None, :]
    return mask, valid


def param_table(model: nnx.Module) -> str:
    """A table of every parameter: path, shape, logical axes, count; and the total."""
    rows = []
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        axes = var.get_metadata().get("out_sharding")
        n = int(np.prod(shape))
        total += n
        rows.append((name, str(shape), str(axes), f"{n:,}"))
    widths = [max(len(r[i]) for r in [("path", "shape", "axes", "count"), *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:3]) + f"  {{:>{widths[3]}}}"
    lines = [fmt.format("path", "shape", "axes", "count")]
    lines += [fmt.format(*r) for r in rows]
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines)


def count_params(tree) -> int:
    """Number of parameters in a module (its nnx.Param variables) or in a pytree of arrays."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
