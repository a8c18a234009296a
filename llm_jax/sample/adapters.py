"""Adapters from the project's models to the engine's `Decoder` protocol.

An adapter holds a model split the NNX way (DESIGN.md): the `GraphDef` is static (hashable,
it keys the compiled program) and the parameters are the pytree that `jax.jit` traces, so
the same program serves every checkpoint of the same architecture. Inside the compiled
loop the adapter merges them back and calls the model:

- `GPTDecoder`: `model.init_cache(B, S)`; `model.decode_step(tokens, cache, ...)`.
- `T5Decoder`: `init_cache` runs `model.encode` on the (right-padded) encoder input and
  `model.init_cache(B, S, encoder_out, encoder_segment_ids)` computes the cross-attention
  keys/values once; `model.decode_step(tokens, cache, ...)` per step.

How the layers run is the adapter's business, fixed when it is built (`cpu_tricks`):
on GPU/TPU the decoder scans over the model's stacked layer weights as they are; on
XLA:CPU it holds them in the per-layer loop form with an unrolled program and a head-major
cache (see `llm_jax.models._xla_cpu` for why). Both give the same tokens.

Every cache an adapter returns is pinned to its logical axes (`KVCache.constrained`):
the identity on one device; inside `activation_sharding` (generate's `mesh=`) it keeps the
while-loop carry split over batch and KV heads like the attention activations, including
after beam search's row gather.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Int

from llm_jax.models import _xla_cpu
from llm_jax.models.cache import KVCache
from llm_jax.models.config import ModelConfig
from llm_jax.models.gpt import GPT
from llm_jax.models.layers import Einsum, num_inputs
from llm_jax.models.t5 import T5
from llm_jax.sample.decoder import DecoderInfo


def _decode_graphdef(
    model: nnx.Module, cfg: ModelConfig, stack: str, *, cpu_tricks: bool
) -> tuple[nnx.GraphDef, tuple[tuple[tuple[str, ...], int], ...]]:
    """The graphdef of the same parameters for decoding: no remat, scanned layers on
    GPU/TPU; unrolled layers with output-major dense kernels in the stack's blocks on CPU
    (see `llm_jax.models._xla_cpu`). Also those kernels' paths inside `blocks` and their
    input axes, which `_cut` transposes to match."""
    scan = not cpu_tricks
    if cfg.scan_layers == scan and cfg.remat_policy == "none" and not cpu_tricks:
        return nnx.split(model)[0], ()
    decode_cfg = cfg.replace(scan_layers=scan, remat_policy="none")
    abstract = nnx.eval_shape(lambda: type(model)(decode_cfg, rngs=nnx.Rngs(0)))
    kernels = _kernel_inputs(abstract, stack) if cpu_tricks else ()
    for path, _ in kernels:
        layer = getattr(abstract, stack).blocks
        for key in path[:-1]:
            layer = getattr(layer, key)
        layer.output_major = True
    return nnx.split(abstract)[0], kernels


def _kernel_inputs(model: Any, stack: str) -> tuple[tuple[tuple[str, ...], int], ...]:
    """The float dense kernels of the stack's blocks: (path inside `blocks`, input axes)."""
    found = []
    for path, module in nnx.iter_graph(getattr(model, stack).blocks):
        if isinstance(module, Einsum) and module.quant is None:
            try:
                n_in = num_inputs(module.equation)
            except ValueError:
                continue
            found.append(((*map(str, path), "kernel"), n_in))
    return tuple(found)


@jax.jit(static_argnums=(1, 2))
def _cut(params: dict[str, Any], stack: str, kernel_inputs: tuple) -> dict[str, Any]:
    """The CPU loop form of `params`: the stack's blocks as per-layer slices, dense kernels
    output-major, cut on device."""
    blocks = _xla_cpu.cut_layers(params[stack]["blocks"], dict(kernel_inputs))
    return {**params, stack: {**params[stack], "blocks": blocks}}


@struct.dataclass
class _ModelDecoder:
    """The plumbing `GPTDecoder` and `T5Decoder` share.

    Attributes:
      graphdef: the model's structure, with the layer program decoding uses (static).
      params: the parameters as a pure dict; in the CPU loop form the decoding stack's
        `blocks` leaves are tuples of per-layer slices.
      info: what the engine checks before compiling (static).
      stack: the attribute name of the layer stack that runs at every step (static).
      cpu_tricks: whether the XLA:CPU forms are in use (static; see the module doc).
    """

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    params: Any
    info: DecoderInfo = struct.field(pytree_node=False)
    stack: str = struct.field(pytree_node=False)
    cpu_tricks: bool = struct.field(pytree_node=False)

    @classmethod
    def _build(cls, model: Any, info: DecoderInfo, stack: str, cpu_tricks: bool | None):
        cpu_tricks = _xla_cpu.use_cpu_tricks() if cpu_tricks is None else cpu_tricks
        params = nnx.to_pure_dict(nnx.state(model))
        graphdef, kernels = _decode_graphdef(model, model.cfg, stack, cpu_tricks=cpu_tricks)
        if cpu_tricks:
            params = _cut(params, stack, kernels)
        return cls(graphdef, params, info, stack, cpu_tricks)

    def _model(self) -> Any:
        params = _xla_cpu.restack(self.params) if self.cpu_tricks else self.params
        return nnx.merge(self.graphdef, params)

    def _in(self, cache: KVCache) -> KVCache:
        return _xla_cpu.restack(cache) if self.cpu_tricks else cache

    def _out(self, cache: KVCache) -> KVCache:
        if self.cpu_tricks:
            cache = cache.replace(
                self_kv=_xla_cpu.cut_layers(cache.self_kv),
                cross_kv=None if cache.cross_kv is None else _xla_cpu.cut_layers(cache.cross_kv),
            )
        return cache.constrained()

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        """fp32 logits [B, T, V] after each of tokens [B, T], and the cache with them."""
        logits, cache = self._model().decode_step(
            tokens, self._in(cache), positions=positions, segment_ids=segment_ids
        )
        return logits.astype(jnp.float32), self._out(cache)

    def take_rows(self, cache: KVCache, rows: Int[Array, " R"]) -> KVCache:
        """The cache of batch rows `rows` [R] (beam reorder and repeat)."""
        return cache.take_rows(rows).constrained()

    def rewind(self, cache: KVCache, index: Int[Array, ""], keep_end: Int[Array, " B"]) -> KVCache:
        """The cache writing next at slot `index`, with slots >= keep_end[b] of row b empty
        (speculative decoding's rollback; the keys and values stay until overwritten)."""
        slots = jnp.arange(cache.max_length)
        valid = cache.valid & (slots[None, :] < keep_end[:, None])  # [B, S]
        return cache.replace(valid=valid, index=jnp.asarray(index, jnp.int32)).constrained()


@struct.dataclass
class GPTDecoder(_ModelDecoder):
    """A decoder-only `GPT` as a `Decoder`."""

    @classmethod
    def from_model(cls, model: GPT, *, cpu_tricks: bool | None = None) -> GPTDecoder:
        """`cpu_tricks`: None picks them on the CPU backend only."""
        cfg = model.cfg
        # Learned position tables bound the sequence length (a soft prompt takes P of the
        # positions); RoPE does not.
        learned = cfg.position == "learned"
        limit = cfg.max_position_embeddings - cfg.prompt_length if learned else None
        info = DecoderInfo(vocab_size=cfg.vocab_size, max_length=limit)
        return cls._build(model, info, "layers", cpu_tricks)

    def init_cache(self, batch_size: int, max_length: int) -> KVCache:
        cache = self._model().init_cache(batch_size, max_length, heads_major=self.cpu_tricks)
        return self._out(cache)


@struct.dataclass
class T5Decoder(_ModelDecoder):
    """An encoder–decoder `T5` as a `Decoder`; `generate`'s prompts are encoder inputs.

    Only the decoder stack takes the CPU loop form: the encoder runs once per call.
    """

    @classmethod
    def from_model(
        cls, model: T5, decoder_start_id: int = 0, *, cpu_tricks: bool | None = None
    ) -> T5Decoder:
        """`decoder_start_id`: the first decoder input (T5 uses the pad id, 0)."""
        cfg = model.cfg
        # Sinusoidal tables bound the lengths; relative positions do not.
        limit = cfg.max_position_embeddings if cfg.position == "sinusoidal" else None
        info = DecoderInfo(
            vocab_size=cfg.vocab_size,
            max_length=limit,
            # A soft prompt (prompt tuning) takes P encoder positions.
            max_encoder_length=None if limit is None else limit - cfg.prompt_length,
            decoder_start_id=decoder_start_id,
        )
        return cls._build(model, info, "decoder", cpu_tricks)

    def init_cache(self, batch_size, max_length, encoder_tokens, encoder_segment_ids):
        model = self._model()
        encoder_out = model.encode(encoder_tokens, segment_ids=encoder_segment_ids)
        cache = model.init_cache(
            batch_size, max_length, encoder_out, encoder_segment_ids, heads_major=self.cpu_tricks
        )
        return self._out(cache)


def as_decoder(model: Any, *, cpu_tricks: bool | None = None) -> GPTDecoder | T5Decoder:
    """The adapter for one of the project's models.

    Args:
      model: a `GPT` or `T5`.
      cpu_tricks: use the XLA:CPU forms (see `llm_jax.models._xla_cpu`); None: on the CPU
        backend only.

    Raises:
      TypeError: `model` is neither a `Decoder` nor a model with an adapter (BERT is an
        encoder and does not generate).
    """
    if isinstance(model, GPT):
        return GPTDecoder.from_model(model, cpu_tricks=cpu_tricks)
    if isinstance(model, T5):
        return T5Decoder.from_model(model, cpu_tricks=cpu_tricks)
    raise TypeError(
        f"cannot decode with {type(model).__name__}: pass a GPT or T5 model, or an object "
        "with info, init_cache, tokens_to_logits and take_rows (see llm_jax.sample.decoder; "
        "FunctionDecoder wraps two functions)."
    )
