"""What the decoding engine needs from a model: the `Decoder` protocol.

The engine never imports a model. It talks to a *decoder*: a pytree (its array leaves are
the model's parameters; everything else is static, hashable data) with one record and
three methods:

    info: DecoderInfo
    init_cache(batch_size, max_length[, encoder_tokens [B, S], encoder_segment_ids [B, S]])
        -> cache
    tokens_to_logits(tokens [B, T], positions [B, T], segment_ids [B, T], cache)
        -> (logits [B, T, V] float32, cache)
    take_rows(cache, rows [R]) -> cache of those batch rows, in that order

`tokens_to_logits` is called once with the whole left-padded prompt (prefill, T = prompt
bucket) and then once per generated token (T = 1). `positions` is the absolute position
of each token in its own row (0 for the first real token); `segment_ids` is 1 for real
tokens and 0 for left padding, which the model must mask out. Every call appends its T
tokens to the cache at the cache's own write index, so after the prefill of a [B, T]
prompt the next token lands in slot T for every row (rows share one write index; left
padding is what makes that possible for prompts of different lengths).

An encoder–decoder sets `info.decoder_start_id`; its `init_cache` also takes the
(right-padded) encoder input, runs the encoder and stores what cross-attention needs; the
engine then prefills the decoder with the start token alone. `take_rows` is how beam
search copies each prompt's cache to its beams and reorders the beams at every step.

Speculative decoding (`llm_jax.sample.speculative`) also needs, of both models,

    rewind(cache, index [], keep_end [B]) -> cache whose next write lands at slot `index`,
        with every slot from keep_end[b] on empty in row b (never attended to until
        written again)

which the project's adapters provide (their `KVCache` masks by its `valid` slots).

The decoder is passed to `jax.jit` as an argument, so its parameters are traced, not baked
into the program as constants, and two calls with equal static parts share one compile.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Float, Int

Cache = Any


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
    """Static facts about a decoder that the engine checks before compiling.

    Attributes:
      vocab_size: V; prompt, EOS and stop ids are checked against it (None: unchecked).
      max_length: the longest decoder sequence (prompt + generation) the model or its
        cache can hold; None for no limit.
      max_encoder_length: encoder–decoders: the longest encoder input; None for no limit.
      decoder_start_id: encoder–decoders: the first decoder input (T5: the pad id, 0);
        None for a decoder-only model.
    """

    vocab_size: int | None = None
    max_length: int | None = None
    max_encoder_length: int | None = None
    decoder_start_id: int | None = None

    @property
    def is_encoder_decoder(self) -> bool:
        return self.decoder_start_id is not None


@runtime_checkable
class Decoder(Protocol):
    """A model as the decoding engine sees it (see the module docstring for the contract)."""

    @property
    def info(self) -> DecoderInfo: ...

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

    def take_rows(self, cache: Cache, rows: Int[Array, " R"]) -> Cache:
        """The cache of batch rows `rows` (repeats and reorders allowed)."""
        ...


@struct.dataclass
class FunctionDecoder:
    """A `Decoder` made of two plain functions; the way to decode a toy or hand-written model.

    The functions are static (compared by identity when jit looks up a compiled program),
    so pass the same function objects on every call to reuse the compiled loop.

    Attributes:
      tokens_to_logits_fn: (tokens [B, T], positions [B, T], segment_ids [B, T], cache)
        -> (logits [B, T, V], cache).
      init_cache_fn: (batch_size, max_length[, encoder_tokens, encoder_segment_ids])
        -> cache pytree.
      info: static facts (vocab size, length limits, decoder start id).
      take_rows_fn: (cache, rows [R]) -> cache; None gathers axis 0 of every leaf with a
        rank (the batch axis must then lead every array of the cache).
      rewind_fn: (cache, index [], keep_end [B]) -> cache, for speculative decoding (see
        the module docstring); None: the decoder cannot speculate.
    """

    tokens_to_logits_fn: Callable[..., tuple[Array, Cache]] = struct.field(pytree_node=False)
    init_cache_fn: Callable[..., Cache] = struct.field(pytree_node=False)
    info: DecoderInfo = struct.field(pytree_node=False, default=DecoderInfo())
    take_rows_fn: Callable[[Cache, Array], Cache] | None = struct.field(
        pytree_node=False, default=None
    )
    rewind_fn: Callable[[Cache, Array, Array], Cache] | None = struct.field(
        pytree_node=False, default=None
    )

    def init_cache(self, batch_size: int, max_length: int, *encoder_inputs: Array) -> Cache:
        return self.init_cache_fn(batch_size, max_length, *encoder_inputs)

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        return self.tokens_to_logits_fn(tokens, positions, segment_ids, cache)

    def take_rows(self, cache: Cache, rows: Int[Array, " R"]) -> Cache:
        if self.take_rows_fn is not None:
            return self.take_rows_fn(cache, rows)
        return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else jnp.take(x, rows, axis=0), cache)

    @property
    def rewind(self) -> Callable[[Cache, Array, Array], Cache] | None:
        """`rewind_fn` (None when not given, which `generate` refuses for speculation)."""
        return self.rewind_fn


def init_cache(
    decoder: Decoder,
    batch_size: int,
    max_length: int,
    encoder_tokens: Int[Array, "B S"] | None = None,
    encoder_segment_ids: Int[Array, "B S"] | None = None,
) -> Cache:
    """Calls `decoder.init_cache` with the encoder inputs when the decoder has an encoder."""
    if decoder.info.is_encoder_decoder:
        return decoder.init_cache(batch_size, max_length, encoder_tokens, encoder_segment_ids)
    return decoder.init_cache(batch_size, max_length)
