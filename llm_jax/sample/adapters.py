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

The model's `KVCache` (k/v [L, B, K, S, H], valid [B, S], scalar index, encoder_valid
[B, Se]) has its batch axis inferred by `cache_batch_axes` for beam search.

Loop form (`for_loop`, called by the engine once per compiled loop, outside it): the
models keep each layer stack's parameters stacked [L, ...] and slice layer i at every call.
XLA:CPU materialises such a slice (a copy of the layer's weights) before every matmul:
a gpt2-small batch-1 decode step took ~140 ms that way against ~55 ms without the copies
(busy 2-core CPU; ~25 ms once the o-projection was contracted in place too). The loop
form holds each stacked leaf as a tuple of its L slices, cut once before the loop, and
re-stacks them inside each call with `jnp.stack`; XLA folds the model's static slice of
that concatenation back to the slice itself, so every step reads the weights in place.
Layers run unrolled in the loop form (a scan would slice dynamically and copy again).
The price is one copy of the stacked weights per `generate` call (or per `stream`);
`llm_jax.sample.prepare` makes that copy once for many calls. The
KV cache gets the same treatment: in the loop form its [L, ...] tensors are carried as
per-layer tuples, so each step's write is an in-place update of one layer's buffer instead
of a rebuild of the whole [L, B, K, S, H] cache.

Both adapters pin the cache they return to its logical axes (`CACHE_AXES`) with
`constrain`: the identity on one device; inside `activation_sharding` (generate's `mesh=`)
it keeps the while-loop carry split over batch and KV heads like the attention
activations, including after beam search's row gather.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from llm_jax.models.common import CACHE_AXES, KVCache
from llm_jax.models.config import ModelConfig
from llm_jax.models.gpt import GPT
from llm_jax.models.t5 import T5
from llm_jax.parallel.rules import constrain


def _is_slices(x: Any) -> bool:
    return isinstance(x, tuple)


def _layer_slices(x: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(x[i] for i in range(x.shape[0]))


def _split_stacks(state: nnx.State, stacks: tuple[str, ...]) -> dict[str, Any]:
    """A pure parameter dict whose `<stack>/blocks` leaves [L, ...] become L-tuples."""
    params = dict(nnx.to_pure_dict(state))
    for name in stacks:
        blocks = jax.tree.map(_layer_slices, params[name]["blocks"])
        params[name] = {**params[name], "blocks": blocks}
    return params


def _merge(graphdef: nnx.GraphDef, state: Any, stacks: tuple[str, ...]) -> nnx.Module:
    """The model; loop-form stacks are re-stacked first (folded away by XLA, see above)."""
    if not stacks:
        return nnx.merge(graphdef, state)
    params = dict(state)
    for name in stacks:
        blocks = jax.tree.map(jnp.stack, params[name]["blocks"], is_leaf=_is_slices)
        params[name] = {**params[name], "blocks": blocks}
    return nnx.merge(graphdef, params)


def _unrolled_graphdef(graphdef: nnx.GraphDef, cfg: ModelConfig, cls: type) -> nnx.GraphDef:
    """The graphdef of the same parameters with unrolled layers and no remat."""
    if not cfg.scan_layers and cfg.remat_policy == "none":
        return graphdef
    unrolled = cfg.replace(scan_layers=False, remat_policy="none")
    return nnx.split(nnx.eval_shape(lambda: cls(unrolled, rngs=nnx.Rngs(0))))[0]


def constrain_cache(cache: KVCache) -> KVCache:
    """The cache with every tensor constrained to its logical axes (see `CACHE_AXES`).

    Loop-form caches hold per-layer tuples; each slice drops the leading `layers` axis.
    """

    def one(name: str, x: Any) -> Any:
        if _is_slices(x):
            return tuple(constrain(a, CACHE_AXES[name][1:]) for a in x)
        return constrain(x, CACHE_AXES[name])

    layers = {name: one(name, x) for name, x in cache.layers.items()}
    return cache.replace(layers=layers, valid=constrain(cache.valid, CACHE_AXES["valid"]))


def _split_cache(cache: KVCache) -> KVCache:
    """Loop form: every [L, ...] cache tensor as a tuple of its L per-layer slices."""
    layers = {name: _layer_slices(x) for name, x in cache.layers.items()}
    return cache.replace(layers=layers)


def _join_cache(cache: KVCache) -> KVCache:
    """The model's cache again from the loop form (folded away by XLA like the weights)."""
    layers = {name: jnp.stack(x) if _is_slices(x) else x for name, x in cache.layers.items()}
    return cache.replace(layers=layers)


@struct.dataclass
class GPTDecoder:
    """A decoder-only `GPT` as a `Decoder`.

    `stacks` is empty for the model's own state and ("layers",) in the loop form, where
    `state` is a pure dict holding the layers' parameters as per-layer tuples.
    """

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    state: Any
    cfg: ModelConfig = struct.field(pytree_node=False)
    stacks: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def from_model(cls, model: GPT) -> GPTDecoder:
        graphdef, state = nnx.split(model)
        return cls(graphdef=graphdef, state=state, cfg=model.cfg)

    @property
    def in_loop_form(self) -> bool:
        return bool(self.stacks)

    def for_loop(self) -> GPTDecoder:
        """The same decoder with per-layer weight slices cut once (see the module doc)."""
        if self.stacks:
            return self
        return self.replace(
            graphdef=_unrolled_graphdef(self.graphdef, self.cfg, GPT),
            state=_split_stacks(self.state, ("layers",)),
            stacks=("layers",),
        )

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def max_length(self) -> int | None:
        """Learned position tables bound the sequence length; RoPE does not."""
        return self.cfg.max_position_embeddings if self.cfg.position == "learned" else None

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        model = _merge(self.graphdef, self.state, self.stacks)
        return self._out_cache(model.init_cache(batch_size, max_length))

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        model = _merge(self.graphdef, self.state, self.stacks)
        logits, cache = model(
            tokens, positions=positions, segment_ids=segment_ids, cache=_join_cache(cache)
        )
        return logits.astype(jnp.float32), self._out_cache(cache)

    def _out_cache(self, cache: KVCache) -> KVCache:
        return constrain_cache(_split_cache(cache) if self.stacks else cache)


@struct.dataclass
class T5Decoder:
    """An encoder–decoder `T5` as a `Decoder`; `generate`'s prompts are encoder inputs.

    In the loop form (`stacks` = ("decoder",)) the decoder stack's parameters are
    per-layer tuples; the encoder runs once per call, so its stack stays as it is.
    """

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    state: Any
    cfg: ModelConfig = struct.field(pytree_node=False)
    decoder_start_id: int = struct.field(pytree_node=False, default=0)
    is_encoder_decoder: bool = struct.field(pytree_node=False, default=True)
    stacks: tuple[str, ...] = struct.field(pytree_node=False, default=())

    @classmethod
    def from_model(cls, model: T5, decoder_start_id: int = 0) -> T5Decoder:
        """`decoder_start_id`: the first decoder input (T5 uses the pad id, 0)."""
        graphdef, state = nnx.split(model)
        return cls(graphdef, state, model.cfg, decoder_start_id=decoder_start_id)

    @property
    def in_loop_form(self) -> bool:
        return bool(self.stacks)

    def for_loop(self) -> T5Decoder:
        """The same decoder with per-layer weight slices cut once (see the module doc)."""
        if self.stacks:
            return self
        return self.replace(
            graphdef=_unrolled_graphdef(self.graphdef, self.cfg, T5),
            state=_split_stacks(self.state, ("decoder",)),
            stacks=("decoder",),
        )

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
        model = _merge(self.graphdef, self.state, self.stacks)
        encoder_out = model.encode(encoder_tokens, segment_ids=encoder_segment_ids)
        cache = model.init_cache(batch_size, max_length, encoder_out, encoder_segment_ids)
        return self._out_cache(cache)

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        model = _merge(self.graphdef, self.state, self.stacks)
        logits, cache = model.decode(
            tokens, positions=positions, segment_ids=segment_ids, cache=_join_cache(cache)
        )
        return logits.astype(jnp.float32), self._out_cache(cache)

    def _out_cache(self, cache: KVCache) -> KVCache:
        return constrain_cache(_split_cache(cache) if self.stacks else cache)


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
