"""Adapters from the project's models to the engine's `Decoder` protocol.

An adapter holds a model split the NNX way (DESIGN.md): the `GraphDef` is static (hashable,
it keys the compiled program) and the `State` is the pytree of parameters that `jax.jit`
traces, so the same program serves every checkpoint of the same architecture. Inside the
compiled loop the adapter merges them back and calls the model:

- `GPTDecoder`: `model.init_cache(B, S)`; `model(tokens, positions=, segment_ids=,
  cache=) -> (logits, cache)`.
- `T5Decoder`: `init_cache` runs `model.encode` on the (right-padded) encoder input and
  `model.init_cache(B, S, encoder_out, encoder_segment_ids)` computes the cross-attention
  keys/values once; `model.decode(tokens, positions=, segment_ids=, cache=)` per step.

The model's `KVCache` (k/v [L, B, S, K, H], valid [B, S], scalar index, encoder_valid
[B, Se]) has its batch axis inferred by `cache_batch_axes` for beam search.

Both adapters pin the cache they return to its logical axes (`CACHE_AXES`) with
`constrain`: the identity on one device; inside `activation_sharding` (generate's `mesh=`)
it keeps the while-loop carry split over batch and KV heads like the attention
activations, including after beam search's row gather.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx, struct

from llm_jax.models.common import CACHE_AXES, KVCache
from llm_jax.models.config import ModelConfig
from llm_jax.models.gpt import GPT
from llm_jax.models.t5 import T5
from llm_jax.parallel.rules import constrain


def constrain_cache(cache: KVCache) -> KVCache:
    """The cache with every tensor constrained to its logical axes (see `CACHE_AXES`)."""
    layers = {name: constrain(x, CACHE_AXES[name]) for name, x in cache.layers.items()}
    return cache.replace(layers=layers, valid=constrain(cache.valid, CACHE_AXES["valid"]))


@struct.dataclass
class GPTDecoder:
    """A decoder-only `GPT` as a `Decoder`."""

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    state: nnx.State
    cfg: ModelConfig = struct.field(pytree_node=False)

    @classmethod
    def from_model(cls, model: GPT) -> GPTDecoder:
        graphdef, state = nnx.split(model)
        return cls(graphdef=graphdef, state=state, cfg=model.cfg)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_length(self) -> int | None:
        """Learned position tables bound the sequence length; RoPE does not."""
        return self.cfg.max_position_embeddings if self.cfg.position == "learned" else None

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        model = nnx.merge(self.graphdef, self.state)
        return constrain_cache(model.init_cache(batch_size, max_length))

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        model = nnx.merge(self.graphdef, self.state)
        logits, cache = model(tokens, positions=positions, segment_ids=segment_ids, cache=cache)
        return logits.astype(jnp.float32), constrain_cache(cache)


@struct.dataclass
class T5Decoder:
    """An encoder–decoder `T5` as a `Decoder`; `generate`'s prompts are encoder inputs."""

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    state: nnx.State
    cfg: ModelConfig = struct.field(pytree_node=False)
    decoder_start_id: int = struct.field(pytree_node=False, default=0)
    is_encoder_decoder: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def from_model(cls, model: T5, decoder_start_id: int = 0) -> T5Decoder:
        """`decoder_start_id`: the first decoder input (T5 uses the pad id, 0)."""
        graphdef, state = nnx.split(model)
        return cls(graphdef, state, model.cfg, decoder_start_id=decoder_start_id)

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_length(self) -> int | None:
        """Sinusoidal tables bound the decoder length; relative positions do not."""
        return self.cfg.max_position_embeddings if self.cfg.position == "sinusoidal" else None

    @property
    def max_encoder_length(self) -> int | None:
        return self.max_length

    def init_cache(self, batch_size, max_length, encoder_tokens, encoder_segment_ids):
        model = nnx.merge(self.graphdef, self.state)
        encoder_out = model.encode(encoder_tokens, segment_ids=encoder_segment_ids)
        cache = model.init_cache(batch_size, max_length, encoder_out, encoder_segment_ids)
        return constrain_cache(cache)

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        model = nnx.merge(self.graphdef, self.state)
        logits, cache = model.decode(
            tokens, positions=positions, segment_ids=segment_ids, cache=cache
        )
        return logits.astype(jnp.float32), constrain_cache(cache)


def as_decoder(model: Any) -> GPTDecoder | T5Decoder:
    """The adapter for one of the project's models.

    Raises:
      TypeError: `model` is neither a `Decoder` nor a model with an adapter (BERT is an
        encoder and does not generate).
    """
    if isinstance(model, GPT):
        return GPTDecoder.from_model(model)
    if isinstance(model, T5):
        return T5Decoder.from_model(model)
    raise TypeError(
        f"cannot decode with {type(model).__name__}: pass a GPT or T5 model, or an object "
        "with init_cache(batch_size, max_length) and tokens_to_logits(tokens, positions, "
        "segment_ids, cache) (see llm_jax.sample.decoder; FunctionDecoder wraps two "
        "functions)."
    )
