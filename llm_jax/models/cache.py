"""The decoding cache: typed keys/values per attention layer and the cache of a whole stack.

Shape letters: L layers, B batch, K key/value heads, S cache (or encoder) length, T new
tokens, H head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Int

from llm_jax.models import _xla_cpu
from llm_jax.ops import causal_mask
from llm_jax.parallel.rules import constrain

Axes = tuple[str | None, ...]


@struct.dataclass
class LayerKV:
    """Keys and values of one attention layer, or of L layers stacked on a leading axis.

    Attributes:
      k, v: [B, S, K, H]; when `heads_major` (the XLA:CPU layout, see
        `llm_jax.models._xla_cpu`) k is [B, K, S, H] and v [B, K, H, S]. [L, ...] in front
        when stacked.
      heads_major: the layout (static).
    """

    k: Array
    v: Array
    heads_major: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def of(cls, k: Array, v: Array, *, heads_major: bool) -> LayerKV:
        """Stores keys and values given as [..., B, S, K, H] in the chosen layout."""
        if heads_major:
            k, v = _xla_cpu.to_heads_major(k), _xla_cpu.to_values_major(v)
        return cls(k, v, heads_major)

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype, *, heads_major: bool) -> LayerKV:
        """An empty cache; `shape` is [..., B, S, K, H] whatever the layout."""
        z = jnp.zeros(shape, dtype)
        return cls.of(z, z, heads_major=heads_major)

    def keys_values(self) -> tuple[Array, Array]:
        """Keys and values as [..., B, S, K, H], the attention op's layout."""
        if self.heads_major:
            return _xla_cpu.from_heads_major(self.k), _xla_cpu.from_values_major(self.v)
        return self.k, self.v

    def write(self, k: Array, v: Array, index: Int[Array, ""]) -> LayerKV:
        """The cache with new keys/values [B, T, K, H] written at slots index..index+T-1."""
        new = LayerKV.of(
            k.astype(self.k.dtype), v.astype(self.v.dtype), heads_major=self.heads_major
        )
        k_start, v_start = (0, index, 0, 0), (0, index, 0, 0)
        if self.heads_major:
            k_start, v_start = (0, 0, index, 0), (0, 0, 0, index)
        return self.replace(
            k=jax.lax.dynamic_update_slice(self.k, new.k, k_start),
            v=jax.lax.dynamic_update_slice(self.v, new.v, v_start),
        )

    def axes(self, ndim: int, *, values: bool = False) -> Axes:
        """Logical axes of a k (or, with `values`, a v) tensor of rank `ndim` (4, or 5 when
        stacked)."""
        layout = ("cache_seq", "kv_heads", "kv")
        if self.heads_major:
            layout = ("kv_heads", "kv", "cache_seq") if values else ("kv_heads", "cache_seq", "kv")
        return ("layers",) * (ndim - 4) + ("batch", *layout)

    def logical_axes(self) -> LayerKV:
        """The logical axis names of `k` and `v`, in a `LayerKV` of tuples."""
        return LayerKV(
            self.axes(self.k.ndim), self.axes(self.v.ndim, values=True), self.heads_major
        )

    def constrained(self) -> LayerKV:
        """Every tensor pinned to its logical axes (per-layer tuples lose the `layers` axis)."""
        return self.replace(
            k=jax.tree.map(lambda x: constrain(x, self.axes(x.ndim)), self.k),
            v=jax.tree.map(lambda x: constrain(x, self.axes(x.ndim, values=True)), self.v),
        )

    def take_rows(self, rows: Int[Array, " R"]) -> LayerKV:
        """The cache of batch rows `rows` (the batch axis follows a leading L, if any)."""
        return jax.tree.map(lambda x: jnp.take(x, rows, axis=x.ndim - 4), self)


def attend_beside_cache(cache: LayerKV, q: Array, mask: object, bias: object) -> bool:
    """Whether a cached attention step should read the cache from before its write.

    An XLA:CPU workaround for batch-1 decoding (one new token, the CPU's head-major
    layout): XLA:CPU reads the written cache through a bitcast that drops the batch axis
    and duplicates the in-place update into each reader, each on its own copy of the
    layer's cache (three copies per tensor per step). Attending over the cache as it was
    plus the new key/value (`ops.attention.attention_beside_cache`) leaves the write a
    single user, done in place.
    """
    return (
        cache.heads_major
        and q.shape[0] == 1
        and q.shape[1] == 1
        and bias is None
        and isinstance(mask, jax.Array)
    )


@struct.dataclass
class KVCache:
    """A static-size decoding cache for a stack of L attention layers.

    Attributes:
      self_kv: the self-attention keys/values, stacked [L, B, ., ., H] (see `LayerKV`).
      valid: [B, S] True on slots that hold a real (non-padding) token.
      index: [] int32, the number of slots written so far (the next write position).
      cross_kv: encoder–decoders: the cross-attention keys/values of the encoder output,
        stacked [L, B, ., ., H] and computed once; else None.
      encoder_valid: [B, Se] True on real encoder tokens (encoder–decoders), else None.
    """

    self_kv: LayerKV
    valid: Bool[Array, "B S"]
    index: Int[Array, ""]
    cross_kv: LayerKV | None = None
    encoder_valid: Bool[Array, "B Se"] | None = None

    @classmethod
    def empty(
        cls,
        shape: tuple[int, int, int, int, int],
        dtype,
        *,
        heads_major: bool,
        cross_kv: LayerKV | None = None,
        encoder_valid: Bool[Array, "B Se"] | None = None,
    ) -> KVCache:
        """A cache with no slot written; `shape` is the self-attention [L, B, S, K, H]."""
        _, b, s = shape[:3]
        return cls(
            self_kv=LayerKV.zeros(shape, dtype, heads_major=heads_major),
            valid=jnp.zeros((b, s), bool),
            index=jnp.zeros((), jnp.int32),
            cross_kv=cross_kv,
            encoder_valid=encoder_valid,
        )

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]

    def step(
        self, q_len: int, segment_ids: Int[Array, "B T"] | None
    ) -> tuple[Bool[Array, "B 1 T S"], Bool[Array, "B S"]]:
        """The self-attention mask of T new tokens written at `index`, and the new `valid`.

        A new token at slot index + t sees every valid slot s <= index + t; padding tokens
        (segment id 0, e.g. left padding of a batch of prompts) are never valid keys.
        """
        b, s = self.valid.shape
        new = jnp.ones((b, q_len), bool) if segment_ids is None else segment_ids != 0
        valid = jax.lax.dynamic_update_slice(self.valid, new, (0, self.index))
        mask = causal_mask(q_len, s, q_offset=self.index) & valid[:, None, None, :]
        return mask, valid

    def logical_axes(self) -> KVCache:
        """The logical axis names of every tensor, in a `KVCache` of tuples (for shardings)."""
        return KVCache(
            self_kv=self.self_kv.logical_axes(),
            valid=("batch", "cache_seq"),
            index=(),
            cross_kv=None if self.cross_kv is None else self.cross_kv.logical_axes(),
            encoder_valid=None if self.encoder_valid is None else ("batch", "cache_seq"),
        )

    def constrained(self) -> KVCache:
        """The cache pinned to its logical axes: the identity outside `activation_sharding`;
        inside it keeps a decode loop's carry split like the attention activations."""
        return self.replace(
            self_kv=self.self_kv.constrained(),
            cross_kv=None if self.cross_kv is None else self.cross_kv.constrained(),
            valid=constrain(self.valid, ("batch", "cache_seq")),
        )

    def take_rows(self, rows: Int[Array, " R"]) -> KVCache:
        """The cache of batch rows `rows`, in that order (beam search's reorder and repeat)."""
        return self.replace(
            self_kv=self.self_kv.take_rows(rows),
            valid=jnp.take(self.valid, rows, axis=0),
            cross_kv=None if self.cross_kv is None else self.cross_kv.take_rows(rows),
            encoder_valid=(
                None if self.encoder_valid is None else jnp.take(self.encoder_valid, rows, axis=0)
            ),
        )
