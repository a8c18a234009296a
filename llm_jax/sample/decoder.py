"""What the decoding engine needs from a model: the `Decoder` protocol and cache helpers.

The engine never imports a model. It talks to a *decoder*: a pytree (its array leaves are
the model's parameters; everything else is static, hashable data) with two methods:

    init_cache(batch_size, max_length) -> cache
    tokens_to_logits(tokens [B, T], positions [B, T], segment_ids [B, T], cache)
        -> (logits [B, T, V] float32, cache)

`tokens_to_logits` is called once with the whole left-padded prompt (prefill, T = prompt
bucket) and then once per generated token (T = 1). `positions` is the absolute position
of each token in its own row (0 for the first real token); `segment_ids` is 1 for real
tokens and 0 for left padding, which the model must mask out. Every call appends its T
tokens to the cache at the cache's own write index, so after the prefill of a [B, T]
prompt the next token lands in slot T for every row (rows share one write index; left
padding is what makes that possible for prompts of different lengths).

An encoder–decoder decoder sets `is_encoder_decoder = True` and `decoder_start_id`, and its
`init_cache(batch_size, max_length, encoder_tokens [B, S], encoder_segment_ids [B, S])`
runs the encoder and stores what cross-attention needs; the engine then prefills the
decoder with the start token alone.

Optional attributes the engine reads when present: `max_length` (the longest sequence the
model or its cache can hold, checked before compiling), `vocab_size` (token ids are checked
against it), `cache_batch_axes` (see `cache_batch_axes`), and `for_loop()`: an equivalent
decoder whose parameters are laid out for many calls from one compiled loop (see
`llm_jax.sample.adapters`); the engine calls it once, before the prefill, outside the loop.
A decoder already in that form says so with `in_loop_form = True`.

The decoder is passed to `jax.jit` as an argument, so its parameters are traced, not baked
into the program as constants, and two calls with equal static parts share one compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

Cache = Any


@runtime_checkable
class Decoder(Protocol):
    """A model as the decoding engine sees it (see the module docstring for the contract)."""

    def init_cache(self, batch_size: int, max_length: int, *encoder_inputs: Array) -> Cache:
        """An empty cache for `batch_size` rows of up to `max_length` tokens."""
        ...

    def tokens_to_logits(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        segment_ids: Int[Array, "B T"],
        cache: Cache,
    ) -> tuple[Float[Array, "B T V"], Cache]:
        """Logits for the next token after each of `tokens`, and the cache with them added."""
        ...


@struct.dataclass
class FunctionDecoder:
    """A `Decoder` made of two plain functions; the way to decode a toy or hand-written model.

    The functions are static (compared by identity when jit looks up a compiled program),
    so pass the same function objects on every call to reuse the compiled loop.

    Attributes:
      tokens_to_logits_fn: (tokens [B, T], positions [B, T], segment_ids [B, T], cache)
        -> (logits [B, T, V], cache).
      init_cache_fn: (batch_size, max_length) -> cache pytree.
      max_length: longest sequence the function supports; None for no limit.
      vocab_size: V, used to check prompt ids before compiling; None skips the check.
      cache_batch_axes: per-leaf batch axis of the cache (see `cache_batch_axes`); None
        infers it.
    """

    tokens_to_logits_fn: Callable[..., tuple[Array, Cache]] = struct.field(pytree_node=False)
    init_cache_fn: Callable[..., Cache] = struct.field(pytree_node=False)
    max_length: int | None = struct.field(pytree_node=False, default=None)
    vocab_size: int | None = struct.field(pytree_node=False, default=None)
    cache_batch_axes: Any = struct.field(pytree_node=False, default=None)

    def init_cache(self, batch_size: int, max_length: int, *encoder_inputs: Array) -> Cache:
        return self.init_cache_fn(batch_size, max_length, *encoder_inputs)

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        return self.tokens_to_logits_fn(tokens, positions, segment_ids, cache)


def has_loop_form(decoder: Decoder) -> bool:
    """Whether `loop_form` would change the decoder."""
    return hasattr(decoder, "for_loop") and not getattr(decoder, "in_loop_form", False)


def loop_form(decoder: Decoder) -> Decoder:
    """`decoder.for_loop()` when the decoder has one, else the decoder itself."""
    return decoder.for_loop() if has_loop_form(decoder) else decoder


def init_cache(
    decoder: Decoder,
    batch_size: int,
    max_length: int,
    encoder_tokens: Int[Array, "B S"] | None = None,
    encoder_segment_ids: Int[Array, "B S"] | None = None,
) -> Cache:
    """Calls `decoder.init_cache` with the encoder inputs when the decoder has an encoder."""
    if getattr(decoder, "is_encoder_decoder", False):
        return decoder.init_cache(batch_size, max_length, encoder_tokens, encoder_segment_ids)
    return decoder.init_cache(batch_size, max_length)


def cache_batch_axes(
    decoder: Decoder,
    max_length: int,
    encoder_length: int | None = None,
) -> tuple[int | None, ...]:
    """The batch axis of every cache leaf, in `jax.tree.leaves(cache)` order.

    Beam search repeats the prefilled cache `num_beams` times along the batch axis and
    reorders it along that axis at every step, so it must know where the batch axis is in
    each leaf (the GPT KV cache is `k, v [L, B, K, S, H]`, batch at axis 1, beside a scalar
    write `index` without one and a `valid [B, S]` mask with it at axis 0).

    A decoder may state it as `cache_batch_axes`: an int for every leaf, or a pytree
    matching the cache with an int or None per leaf. Otherwise it is inferred by abstract
    evaluation (no computation) of `init_cache` at batch sizes 1 and 2: the one axis whose
    size changes is the batch axis; a leaf whose shape does not change has none (None).

    Returns:
      A tuple with one entry per cache leaf: its batch axis, or None.

    Raises:
      ValueError: a leaf changes shape on more than one axis, or the stated axes do not
        match the cache.
    """

    def abstract_cache(batch: int):
        encoder = ()
        if getattr(decoder, "is_encoder_decoder", False):
            spec = jax.ShapeDtypeStruct((batch, encoder_length), jnp.int32)
            encoder = (spec, spec)
        return jax.eval_shape(
            lambda d, *enc: init_cache(d, batch, max_length, *enc), decoder, *encoder
        )

    one = abstract_cache(1)
    leaves_one, treedef = jax.tree.flatten(one)
    stated = getattr(decoder, "cache_batch_axes", None)
    if stated is not None:
        if isinstance(stated, int):
            return tuple(None if leaf.ndim == 0 else stated for leaf in leaves_one)
        flat, stated_def = jax.tree.flatten(stated, is_leaf=lambda x: x is None)
        if len(flat) != len(leaves_one):
            raise ValueError(
                f"cache_batch_axes {stated_def} does not match the cache structure {treedef}; "
                "give one int (or None) per cache leaf."
            )
        return tuple(flat)

    leaves_two = jax.tree.leaves(abstract_cache(2))
    axes = []
    for path, a, b in zip(
        jax.tree_util.tree_flatten_with_path(one)[0], leaves_one, leaves_two, strict=True
    ):
        changed = [i for i, (x, y) in enumerate(zip(a.shape, b.shape, strict=True)) if x != y]
        if len(changed) > 1:
            raise ValueError(
                f"cache leaf {jax.tree_util.keystr(path[0])} changes shape on axes {changed} "
                "with the batch size; set `cache_batch_axes` on the decoder."
            )
        axes.append(changed[0] if changed else None)
    return tuple(axes)


def repeat_batch(cache: Cache, axes: tuple[int | None, ...], repeats: int) -> Cache:
    """Repeats every cached row `repeats` times in place: row b becomes rows b*r ... b*r+r-1."""
    leaves, treedef = jax.tree.flatten(cache)
    out = [
        leaf if axis is None else jnp.repeat(leaf, repeats, axis=axis)
        for leaf, axis in zip(leaves, axes, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def take_batch(cache: Cache, axes: tuple[int | None, ...], rows: Int[Array, " R"]) -> Cache:
    """Gathers cache rows `rows` along each leaf's batch axis (the beam reorder)."""
    leaves, treedef = jax.tree.flatten(cache)
    out = [
        leaf if axis is None else jnp.take(leaf, rows, axis=axis)
        for leaf, axis in zip(leaves, axes, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)
