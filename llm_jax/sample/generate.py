"""`generate` and `stream`: checks and padding on the host, then one compiled program.

Everything that can be wrong with a call (a bad strategy, an empty prompt, a negative or
out-of-vocabulary token id, a prompt that does not fit the cache) raises `ValueError` here,
before anything is traced or compiled.

Prompt buckets: decoder prompts are left-padded to `bucket_length(longest prompt)`, the
smallest power of two >= 16 that holds them (16, 32, 64, ...; capped so the cache still
fits `max_length`). Only the bucket, the batch size, max_new_tokens, the strategy and the
number/length of EOS ids and stop sequences shape the compiled program, so new prompt
lengths within a bucket reuse it. Encoder inputs (encoder–decoder models) are right-padded
to the same buckets.

Batch buckets: the batch is padded to the next power of two with copies of the first prompt
(`batch_bucket`), which start finished (greedy / sampling) or behave exactly like the first
prompt (beam search), and are dropped from the output; so a new batch size within a bucket
reuses the compiled program too.

Speculative decoding (`Speculative(draft, k)`): the draft decoder is a traced argument
next to the model's, checked against it (vocabulary, architecture kind, length limits and
`rewind`) before compiling; see `llm_jax.sample.speculative`.

Sharded decoding: pass `mesh` and `rules` (and parameters placed on that mesh, e.g. with
`llm_jax.parallel.logical_to_sharding`) and the program is traced inside
`activation_sharding(mesh, rules)`, so the model's activation constraints and the adapters'
KV-cache constraints (`llm_jax.models.KVCache.logical_axes`) shard it. The mesh and rules are
static arguments of the compiled program, so the same call with and without them never
shares a trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import struct
from jax.sharding import Mesh
from jaxtyping import Array, Bool, Float, Int

from llm_jax.sample.beam import beam_output_fields, run_beam_search
from llm_jax.sample.decoder import Decoder
from llm_jax.sample.loop import (
    Controls,
    LoopSpec,
    Prompt,
    SamplingState,
    decode_step,
    is_running,
    output_fields,
    prefill,
    run_sampling,
)
from llm_jax.sample.speculative import (
    SpeculativeState,
    live_rows,
    run_speculative,
    speculative_output_fields,
    speculative_round,
    start_speculative,
)
from llm_jax.sample.speculative import (
    cache_length as speculative_cache_length,
)
from llm_jax.sample.strategies import Beam, Greedy, Sample, Speculative

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh and its logical-axis rules as one hashable, static argument."""

    mesh: Mesh
    rules: tuple[tuple[str, Any], ...]

    @classmethod
    def make(cls, mesh: Mesh | None, rules: str | dict[str, Any] | None) -> MeshRules | None:
        """None without a mesh; rules are a `llm_jax.parallel.RULES` name or a dict."""
        if mesh is None:
            if rules is not None:
                raise ValueError("rules= needs mesh=: pass the mesh the parameters live on.")
            return None
        from llm_jax.parallel.mesh import RULES

        if rules is None or (isinstance(rules, str) and rules not in RULES):
            raise ValueError(
                f"mesh= needs rules= naming one of {sorted(RULES)} or a logical-axis dict; "
                f"got {rules!r}."
            )
        table = RULES[rules] if isinstance(rules, str) else rules
        items = ((k, tuple(v) if isinstance(v, list) else v) for k, v in table.items())
        return cls(mesh, tuple(sorted(items)))

    def context(self) -> contextlib.AbstractContextManager:
        from llm_jax.parallel.rules import activation_sharding

        return activation_sharding(self.mesh, dict(self.rules))


def _sharding_context(sharding: MeshRules | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if sharding is None else sharding.context()


@struct.dataclass
class GenerateOutput:
    """What `generate` returns. Generated tokens only (not the prompt), pad_id after the end.

    Greedy / Sample: tokens [B, N], lengths [B], finished [B], log_probs [B, N], scores None.
    Beam: tokens [B, R, N], lengths [B, R], finished [B, R], log_probs [B, R, N], scores
    [B, R], with R = num_return_sequences, best first. N = max_new_tokens.

    Attributes:
      tokens: int32 generated ids, counting the EOS / stop-sequence token that ended a row.
      lengths: int32 number of generated tokens in each row (EOS / stop token included).
      finished: True where the row ended with EOS or a stop sequence, False where it ran
        out of max_new_tokens.
      log_probs: float32, only with return_log_probs=True. Greedy / Sample: log p(token)
        under the model (log_softmax of the raw logits: no temperature, no filters), 0
        after the end. Beam: the per-token terms of the beam score (EOS at -inf before
        min_new_tokens), so scores == log_probs.sum(-1) / lengths ** length_penalty.
      scores: beam only: float32 HF beam scores, sum(log p) / lengths ** length_penalty.
      draft_accepted: Speculative only: int32 [B] draft tokens the model accepted per row.
      draft_proposed: Speculative only: int32 [B] draft tokens proposed per row (k per
        round while the row was live).
    """

    tokens: Int[Array, "..."]
    lengths: Int[Array, "..."]
    finished: Bool[Array, "..."]
    log_probs: Float[Array, "..."] | None = None
    scores: Float[Array, "..."] | None = None
    draft_accepted: Int[Array, " B"] | None = None
    draft_proposed: Int[Array, " B"] | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Speculative only: accepted / proposed draft tokens over the whole batch."""
        if self.draft_proposed is None:
            return None
        proposed = int(np.sum(np.asarray(self.draft_proposed)))
        return int(np.sum(np.asarray(self.draft_accepted))) / max(proposed, 1)

    def to_lists(self) -> list:
        """The generated ids as Python lists, each cut at its length (nested per beam)."""
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)

        def cut(toks: np.ndarray, lens: np.ndarray) -> list:
            if toks.ndim == 1:
                return toks[: int(lens)].tolist()
            return [cut(row, n) for row, n in zip(toks, lens, strict=True)]

        return cut(tokens, lengths)


def bucket_length(length: int, limit: int | None = None) -> int:
    """The padded prompt length for a prompt of `length` tokens.

    The smallest power of two that is >= max(length, 16); if that exceeds `limit` (the
    room left in the cache) but `length` does not, `limit` itself.
    """
    bucket = max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())
    if limit is not None and length <= limit < bucket:
        return limit
    return bucket


def batch_bucket(batch_size: int) -> int:
    """The padded batch size: the smallest power of two >= batch_size."""
    return 1 << (max(batch_size, 1) - 1).bit_length()


def as_decoder(
    model: Any, *, mesh: Mesh | None = None, rules: str | dict[str, Any] | None = None
) -> Decoder:
    """The `Decoder` for `model`: itself if it implements the protocol, else its adapter.

    Build it once to pass to many `generate` / `stream` calls: on XLA:CPU the adapter
    lays the layer weights out per layer (see `llm_jax.models._xla_cpu`), a copy of them
    that `generate(model, ...)` would otherwise make at every call. It snapshots the
    parameters: build it again after changing them.

    Args:
      model: a `Decoder`, or a GPT / T5 model (adapted by `llm_jax.sample.adapters`).
      mesh, rules: as for `generate`; the mesh's platform picks the layout (default: JAX's
        default backend).
    """
    if isinstance(model, Decoder):
        return model
    MeshRules.make(mesh, rules)  # the same checks as generate's
    from llm_jax.models._xla_cpu import use_cpu_tricks
    from llm_jax.sample import adapters  # models are optional dependencies of the engine

    backend = None if mesh is None else mesh.devices.flat[0].platform
    return adapters.as_decoder(model, cpu_tricks=use_cpu_tricks(backend))


def _check_ids(name: str, ids: np.ndarray, vocab_size: int | None) -> None:
    if ids.size and ids.min() < 0:
        raise ValueError(f"{name} contains negative token id {int(ids.min())}; ids must be >= 0.")
    if vocab_size is not None and ids.size and ids.max() >= vocab_size:
        raise ValueError(
            f"{name} contains token id {int(ids.max())} >= vocab_size {vocab_size}; "
            "check the tokenizer matches the model."
        )


def _as_prompts(prompt_ids: Any, vocab_size: int | None) -> list[np.ndarray]:
    """A batch of 1-D int prompts from a 2-D array, a list of sequences or one sequence."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        array = np.asarray(prompt_ids)
        if array.ndim not in (1, 2):
            raise ValueError(f"prompt_ids must be 1-D or 2-D; got shape {array.shape}.")
        rows = [array] if array.ndim == 1 else list(array)
    else:
        rows = list(prompt_ids)
        if rows and np.ndim(rows[0]) == 0:
            rows = [rows]  # a single prompt given as a flat list of ids
    if not rows:
        raise ValueError("prompt_ids is an empty batch; pass at least one prompt.")
    prompts = []
    for i, row in enumerate(rows):
        ids = np.asarray(row)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(
                f"prompt {i} is empty or not a flat sequence (shape {ids.shape}); every "
                "prompt needs at least one token (e.g. a BOS id)."
            )
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i} has dtype {ids.dtype}; token ids must be integers.")
        _check_ids(f"prompt {i}", ids, vocab_size)
        prompts.append(ids.astype(np.int32))
    return prompts


def pad_prompts(prompts: Sequence[np.ndarray], length: int, pad_id: int) -> Prompt:
    """Left-pads prompts to `length`: segment id 0 on padding, positions 0.. per row.

    Left padding puts every row's last prompt token in the same column, so the first
    generated token of every row lands in the same cache slot and one write index serves
    the whole batch.
    """
    batch = len(prompts)
    tokens = np.full((batch, length), pad_id, np.int32)
    positions = np.zeros((batch, length), np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    for i, ids in enumerate(prompts):
        n = len(ids)
        tokens[i, length - n :] = ids
        positions[i, length - n :] = np.arange(n)
        segment_ids[i, length - n :] = 1
    lengths = np.array([len(p) for p in prompts], np.int32)
    return Prompt(tokens=tokens, positions=positions, segment_ids=segment_ids, lengths=lengths)


def _right_pad(prompts: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, ...]:
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    segment_ids = np.zeros((len(prompts), length), np.int32)
    for i, ids in enumerate(prompts):
        tokens[i, : len(ids)] = ids
        segment_ids[i, : len(ids)] = 1
    return tokens, segment_ids


def _token_list(name: str, value: Any, vocab_size: int | None) -> np.ndarray:
    ids = np.asarray([] if value is None else value, dtype=np.int64).reshape(-1)
    _check_ids(name, ids, vocab_size)
    return ids.astype(np.int32)


def _stop_array(stop_sequences: Sequence[Sequence[int]], vocab_size: int | None) -> np.ndarray:
    """[S, W] int32: each stop sequence right-aligned, -1 to its left (W = longest)."""
    seqs = [np.asarray(s, dtype=np.int64).reshape(-1) for s in stop_sequences]
    for i, s in enumerate(seqs):
        if s.size == 0:
            raise ValueError(f"stop_sequences[{i}] is empty; give each at least one token id.")
        _check_ids(f"stop_sequences[{i}]", s, vocab_size)
    width = max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), width), -1, np.int32)
    for i, s in enumerate(seqs):
        out[i, width - len(s) :] = s
    return out


@dataclasses.dataclass(frozen=True)
class Request:
    """Every knob of one `generate` / `stream` call, checked when it is built.

    The checks that need the model (token ids against its vocabulary, lengths against its
    cache) run later, in `_check_and_pad`; all of them run before anything is compiled.

    Attributes:
      max_new_tokens: N, the most tokens generated per prompt.
      strategy: `Greedy()` (the default; None means it), `Sample(temperature, top_k,
        top_p)`, `Beam(...)` or `Speculative(draft, k, sampling)`. `Sample(temperature=0)`
        is stored as `Greedy()`.
      eos_id: one id or several ids that end a row; None for no EOS.
      min_new_tokens: EOS is forbidden until this many tokens were generated.
      stop_sequences: token sequences; a row ends once its generated tokens end with one
        (the sequence stays in the output, like EOS).
      pad_id: fills the output after a row's end (and the prompt padding).
      return_log_probs: also return per-token log-probs (see `GenerateOutput`).
      max_length: longest prompt + generation the model supports; defaults to the
        decoder's `max_length` attribute (None: no limit).
    """

    max_new_tokens: int
    strategy: Greedy | Sample | Beam | Speculative | None = None
    eos_id: int | Sequence[int] | None = None
    min_new_tokens: int = 0
    stop_sequences: Sequence[Sequence[int]] = ()
    pad_id: int = 0
    return_log_probs: bool = False
    max_length: int | None = None

    def __post_init__(self) -> None:
        strategy = Greedy() if self.strategy is None else self.strategy
        if not isinstance(strategy, (Greedy, Sample, Beam, Speculative)):
            raise ValueError(
                "strategy must be Greedy(), Sample(...), Beam(...) or Speculative(...); "
                f"got {strategy!r}."
            )
        if isinstance(strategy, Sample) and strategy.is_greedy:
            strategy = Greedy()  # temperature 0: the same program as Greedy()
        object.__setattr__(self, "strategy", strategy)
        n = self.max_new_tokens
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1; got {n!r}.")
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= n:
            raise ValueError(
                f"min_new_tokens must be an int in [0, max_new_tokens={n}]; "
                f"got {self.min_new_tokens!r}."
            )
        if not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ValueError(f"pad_id must be an int >= 0; got {self.pad_id!r}.")
        if self.max_length is not None and (
            not isinstance(self.max_length, (int, np.integer)) or self.max_length < 2
        ):
            raise ValueError(
                f"max_length must be None or an int >= 2 (a prompt token and a generated "
                f"one); got {self.max_length!r}."
            )


_REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(Request))


def _request(caller: str, knobs: dict[str, Any], refused: tuple[str, ...] = ()) -> Request:
    """The `Request` of a `generate` / `stream` call from its keyword arguments."""
    allowed = [name for name in _REQUEST_FIELDS if name not in refused]
    unknown = sorted(set(knobs) - set(allowed))
    if unknown:
        raise TypeError(
            f"{caller}() got unexpected keyword arguments {unknown}; it takes rng, mesh, "
            f"rules and {allowed}."
        )
    if "max_new_tokens" not in knobs:
        raise TypeError(f"{caller}() needs max_new_tokens=, the most tokens per prompt.")
    return Request(**knobs)


def check_fits(
    length: int,
    max_new_tokens: int,
    max_length: int | None,
    *,
    prompt: str = "the longest prompt",
    new: str = "max_new_tokens",
    limit: str = "max_length is {}",
) -> None:
    """Raises `ValueError` naming what to change unless a prompt and its generation fit.

    The one length check of decoding (the CLI calls it with its flag names).

    Args:
      length: prompt tokens.
      max_new_tokens: tokens to generate after them; 0 for an encoder input, which only
        has to fit `max_length` itself.
      max_length: positions the model has; None for no limit.
      prompt, new, limit: how the message names the prompt, max_new_tokens and the limit
        (`limit` is formatted with `max_length`).
    """
    room = None if max_length is None else max_length - (1 if max_new_tokens else 0)
    if room is None or length + max_new_tokens <= max_length:
        return
    bound = limit.format(max_length)
    if length > room and (length > 1 or not max_new_tokens):
        # The prompt alone leaves no slot to write (or the encoder input is too long).
        raise ValueError(
            f"{prompt} has {length} tokens but {bound}; shorten {prompt} to at most {room} tokens."
        )
    shorten = max_length - max_new_tokens
    fix = f" or shorten {prompt} to at most {shorten} tokens" if length > 1 and shorten > 0 else ""
    raise ValueError(
        f"{prompt} has {length} tokens and {new} is {max_new_tokens}, "
        f"{length + max_new_tokens} positions in all, but {bound}; lower {new} to at most "
        f"{max_length - length}{fix}."
    )


def _sampling_key(
    strategy: Greedy | Sample | Beam | Speculative, rng: jax.Array | int | None
) -> jax.Array | None:
    """The PRNG key of a `Sample` call; None otherwise, so greedy and beam search (which are
    deterministic) compile one program with or without a key."""
    if isinstance(strategy, Speculative):
        strategy = strategy.sampling
    if not isinstance(strategy, Sample):
        return None
    if rng is None:
        raise ValueError("Sample(...) needs a PRNG key: pass rng=jax.random.key(seed).")
    return jax.random.key(rng) if isinstance(rng, int) else rng


def _controls(req: Request, vocab_size: int | None) -> Controls:
    return Controls(
        eos_ids=_token_list("eos_id", req.eos_id, vocab_size),
        stop_sequences=_stop_array(req.stop_sequences, vocab_size),
        min_new_tokens=np.int32(req.min_new_tokens),
        pad_id=np.int32(req.pad_id),
    )


def _max_length(decoder: Decoder, req: Request) -> int | None:
    return req.max_length if req.max_length is not None else decoder.info.max_length


def _pad_decoder_prompts(prompts: list[np.ndarray], decoder: Decoder, req: Request) -> Prompt:
    """Decoder-only prompts, left-padded to their bucket (see `pad_prompts`)."""
    limit = _max_length(decoder, req)
    longest = max(len(p) for p in prompts)
    check_fits(longest, req.max_new_tokens, limit)
    room = None if limit is None else limit - req.max_new_tokens
    return pad_prompts(prompts, bucket_length(longest, room), req.pad_id)


def _pad_encoder_prompts(prompts: list[np.ndarray], decoder: Decoder, req: Request) -> Prompt:
    """Encoder inputs, right-padded to their bucket; the decoder starts from its start id."""
    encoder_limit = decoder.info.max_encoder_length
    longest = max(len(p) for p in prompts)
    check_fits(
        longest,
        0,
        encoder_limit,
        prompt="the longest encoder input",
        limit="the model takes at most {}",
    )
    check_fits(
        1,
        req.max_new_tokens,
        _max_length(decoder, req),
        prompt="the decoder's start token",
        limit="the decoder's max_length is {}",
    )
    encoder_tokens, encoder_segments = _right_pad(
        prompts, bucket_length(longest, encoder_limit), req.pad_id
    )
    start = np.full((len(prompts), 1), decoder.info.decoder_start_id, np.int32)
    return Prompt(
        tokens=start,
        positions=np.zeros_like(start),
        segment_ids=np.ones_like(start),
        lengths=np.ones((len(prompts),), np.int32),
        encoder_tokens=encoder_tokens,
        encoder_segment_ids=encoder_segments,
    )


def _check_and_pad(
    model: Any,
    prompt_ids: Any,
    req: Request,
    rng: jax.Array | int | None,
    *,
    mesh: Mesh | None = None,
    rules: str | dict[str, Any] | None = None,
) -> tuple[Decoder, Prompt, Controls, jax.Array | None, LoopSpec]:
    """All host-side checks and padding shared by `generate` and `stream`; the mesh's
    platform (not the default backend) picks the decoder's layout."""
    rng = _sampling_key(req.strategy, rng)
    decoder = as_decoder(model, mesh=mesh, rules=rules)
    vocab_size = decoder.info.vocab_size
    controls = _controls(req, vocab_size)
    prompts = _as_prompts(prompt_ids, vocab_size)
    batch = len(prompts)
    prompts += [prompts[0]] * (batch_bucket(batch) - batch)
    if decoder.info.is_encoder_decoder:
        prompt = _pad_encoder_prompts(prompts, decoder, req)
    else:
        prompt = _pad_decoder_prompts(prompts, decoder, req)
    prompt = prompt.replace(dummy=np.arange(len(prompts)) >= batch)
    strategy, k = req.strategy, 0
    length = prompt.tokens.shape[1] + req.max_new_tokens
    if isinstance(strategy, Speculative):
        strategy, k = strategy.sampling, strategy.k
        length = speculative_cache_length(
            prompt.tokens.shape[1], req.max_new_tokens, len(prompts), k
        )
        _check_speculative_length(decoder, length, len(prompts), req)
    spec = LoopSpec(
        strategy=strategy,
        max_new_tokens=req.max_new_tokens,
        cache_length=length,
        return_log_probs=bool(req.return_log_probs),
        speculate_k=k,
    )
    return decoder, prompt, controls, rng, spec


def _check_speculative_length(decoder: Decoder, length: int, batch: int, req: Request) -> None:
    """Speculation's holes need more cache slots than positions; a model whose cache is
    bounded (learned positions) must hold them."""
    limit = _max_length(decoder, req)
    if limit is not None and length > limit:
        raise ValueError(
            f"speculative decoding of a batch of {batch} (bucketed) with "
            f"max_new_tokens={req.max_new_tokens} needs {length} cache slots (rows accept "
            f"different numbers of tokens and leave holes), but the model has {limit} "
            "positions; lower max_new_tokens, k or the batch size."
        )


def _draft_decoder(
    decoder: Decoder,
    prompt: Prompt,
    req: Request,
    *,
    mesh: Mesh | None = None,
    rules: str | dict[str, Any] | None = None,
) -> Decoder | None:
    """The draft of a `Speculative` call as a `Decoder`, checked against the model."""
    strategy = req.strategy
    if not isinstance(strategy, Speculative):
        return None
    draft = strategy.draft
    if isinstance(draft, (str, os.PathLike)):
        from llm_jax.convert.load import load_for_inference

        draft = load_for_inference(str(draft), None, None).model
    draft = as_decoder(draft, mesh=mesh, rules=rules)
    ours, theirs = decoder.info, draft.info
    if None not in (ours.vocab_size, theirs.vocab_size) and ours.vocab_size != theirs.vocab_size:
        raise ValueError(
            f"the draft's vocabulary has {theirs.vocab_size} tokens but the model's has "
            f"{ours.vocab_size}; speculative decoding needs a draft trained with the "
            "model's tokenizer."
        )
    if ours.is_encoder_decoder != theirs.is_encoder_decoder:
        raise ValueError(
            "the draft and the model must both be decoder-only or both encoder-decoders."
        )
    for name, d in (("the model", decoder), ("the draft", draft)):
        if getattr(d, "rewind", None) is None:
            raise ValueError(
                f"{name} has no rewind(cache, index, keep_end), which speculative decoding "
                "needs (see llm_jax.sample.decoder); FunctionDecoder takes rewind_fn=."
            )
    longest = int(np.max(np.asarray(prompt.lengths)))
    check_fits(longest, req.max_new_tokens, theirs.max_length, limit="the draft's max_length is {}")
    _check_speculative_length(
        draft,
        speculative_cache_length(
            prompt.tokens.shape[1], req.max_new_tokens, prompt.tokens.shape[0], req.strategy.k
        ),
        prompt.tokens.shape[0],
        dataclasses.replace(req, max_length=None),
    )
    return draft


@functools.partial(jax.jit, static_argnames=("spec", "sharding"))
def _generate_jit(
    decoder: Decoder,
    prompt: Prompt,
    controls: Controls,
    rng: jax.Array | None,
    spec: LoopSpec,
    sharding: MeshRules | None = None,
    draft: Decoder | None = None,
) -> dict[str, Array | None]:
    with _sharding_context(sharding):
        if spec.speculate_k:
            state = run_speculative(decoder, draft, prompt, controls, rng, spec)
            return speculative_output_fields(state)
        if isinstance(spec.strategy, Beam):
            return beam_output_fields(spec, run_beam_search(decoder, prompt, controls, spec))
        return output_fields(run_sampling(decoder, prompt, controls, rng, spec))


def generate(
    model: Any,
    prompt_ids: Any,
    *,
    rng: jax.Array | int | None = None,
    mesh: Mesh | None = None,
    rules: str | dict[str, Any] | None = None,
    **request: Any,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens after each prompt, as one compiled call.

    Args:
      model: a `Decoder` (see `llm_jax.sample.decoder`) or a model with an adapter in
        `llm_jax.sample.adapters`.
      prompt_ids: one prompt (a flat sequence of ids), a list of prompts of any lengths,
        or a [B, T] int array (every row T real tokens). Encoder–decoder models: the
        encoder inputs (the decoder starts from the decoder's `decoder_start_id`).
      rng: PRNG key (or int seed) for `Sample`; ignored by greedy and beam search.
      mesh: decode sharded on this mesh (the parameters should already live on it);
        None runs wherever the parameters are.
      rules: with `mesh`: a `llm_jax.parallel.RULES` name ("dp", "fsdp", "fsdp_tp") or a
        logical-axis rules dict, applied to activations and the KV cache.
      **request: the fields of `Request`, which documents them: max_new_tokens
        (required), strategy, eos_id, min_new_tokens, stop_sequences, pad_id,
        return_log_probs, max_length.

    Returns:
      A `GenerateOutput`; greedy / sample fields are [B, ...], beam fields [B, R, ...].

    Raises:
      ValueError: bad arguments, empty prompts, token ids < 0 or >= vocab_size, or
        prompt + max_new_tokens > max_length; raised before compiling.
      TypeError: an unknown keyword, or no max_new_tokens.
    """
    req = _request("generate", request)
    decoder, prompt, controls, rng, spec = _check_and_pad(
        model, prompt_ids, req, rng, mesh=mesh, rules=rules
    )
    draft = _draft_decoder(decoder, prompt, req, mesh=mesh, rules=rules)
    sharding = MeshRules.make(mesh, rules)
    fields = _generate_jit(decoder, prompt, controls, rng, spec, sharding, draft)
    batch = int(np.sum(~np.asarray(prompt.dummy)))
    return GenerateOutput(**jax.tree.map(lambda x: x[:batch], fields))


@functools.partial(jax.jit, static_argnames=("spec", "sharding"))
def _stream_prefill(
    decoder: Decoder,
    prompt: Prompt,
    controls: Controls,
    rng: jax.Array | None,
    spec: LoopSpec,
    sharding: MeshRules | None = None,
) -> SamplingState:
    with _sharding_context(sharding):
        return prefill(decoder, prompt, controls, rng, spec)


@functools.partial(jax.jit, static_argnames=("spec", "sharding"), donate_argnames=("state",))
def _stream_step(
    decoder: Decoder,
    controls: Controls,
    state: SamplingState,
    spec: LoopSpec,
    sharding: MeshRules | None = None,
) -> tuple[SamplingState, Array]:
    with _sharding_context(sharding):
        state = decode_step(decoder, controls, spec, state)
        return state, is_running(spec, state)


def stream(
    model: Any,
    prompt_ids: Any,
    *,
    rng: jax.Array | int | None = None,
    mesh: Mesh | None = None,
    rules: str | dict[str, Any] | None = None,
    **request: Any,
) -> Iterator[np.ndarray]:
    """Like `generate`, but yields each step's tokens as soon as they exist.

    The prefill and the single decode step are jitted separately (the step donates its
    state so the cache is updated in place); Python drives the loop, so a caller can print
    tokens interactively. With the same arguments the yielded tokens equal
    `generate(...).tokens` column by column (sampling draws the same random numbers).

    Arguments are those of `generate`, less return_log_probs (beam search is not
    streamable either: its best hypothesis changes after the fact). The arguments are
    checked when `stream` is called, before the first token is requested.

    Returns:
      An iterator of [B] int32 arrays: token t of every row, pad_id for rows that ended.
      With `Speculative(...)` a round yields the columns every row has reached (rows
      accept different numbers of draft tokens), and the iterator is a
      `SpeculativeStream` with the acceptance rate so far.
    """
    req = _request("stream", request, refused=("return_log_probs",))
    if isinstance(req.strategy, Beam):
        raise ValueError(
            "stream() supports Greedy(), Sample(...) and Speculative(...); use generate() "
            "for Beam(...)."
        )
    decoder, prompt, controls, rng, spec = _check_and_pad(
        model, prompt_ids, req, rng, mesh=mesh, rules=rules
    )
    sharding = MeshRules.make(mesh, rules)
    batch = int(np.sum(~np.asarray(prompt.dummy)))
    draft = _draft_decoder(decoder, prompt, req, mesh=mesh, rules=rules)
    if draft is not None:
        return SpeculativeStream(decoder, draft, prompt, controls, rng, spec, sharding, batch)

    def tokens() -> Iterator[np.ndarray]:
        state = _stream_prefill(decoder, prompt, controls, rng, spec, sharding)
        running = is_running(spec, state)
        yield np.asarray(state.tokens[:batch, 0])
        while bool(running):
            step = int(state.step)
            state, running = _stream_step(decoder, controls, state, spec, sharding)
            yield np.asarray(state.tokens[:batch, step])

    return tokens()


@functools.partial(jax.jit, static_argnames=("spec", "sharding"))
def _speculative_start(
    decoder: Decoder,
    draft: Decoder,
    prompt: Prompt,
    controls: Controls,
    rng: jax.Array | None,
    spec: LoopSpec,
    sharding: MeshRules | None = None,
) -> tuple[SpeculativeState, Bool[Array, " B"]]:
    with _sharding_context(sharding):
        state = start_speculative(decoder, draft, prompt, controls, rng, spec)
        return state, live_rows(spec, state)


@functools.partial(jax.jit, static_argnames=("spec", "sharding"), donate_argnames=("state",))
def _speculative_step(
    decoder: Decoder,
    draft: Decoder,
    controls: Controls,
    state: SpeculativeState,
    spec: LoopSpec,
    sharding: MeshRules | None = None,
) -> tuple[SpeculativeState, Bool[Array, " B"]]:
    with _sharding_context(sharding):
        state = speculative_round(decoder, draft, controls, spec, state)
        return state, live_rows(spec, state)


class SpeculativeStream:
    """`stream(..., strategy=Speculative(...))`: [B] token columns as the verification
    rounds produce them, equal to `generate(...).tokens` column by column (the rounds
    draw the same random numbers as generate's loop).

    A column is yielded once every row has it (a row that ended has pad_id there), so a
    round that accepts k drafts in every row yields k + 1 columns at once.
    `acceptance_rate` is accepted / proposed draft tokens so far, over the batch.
    """

    def __init__(self, decoder, draft, prompt, controls, rng, spec, sharding, batch: int):
        self._args = (decoder, draft, prompt, controls, rng, spec, sharding)
        self._batch = batch
        self.accepted = self.proposed = 0
        self._columns = self._run()

    def __iter__(self) -> SpeculativeStream:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._columns)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    def _run(self) -> Iterator[np.ndarray]:
        decoder, draft, prompt, controls, rng, spec, sharding = self._args
        state, live = _speculative_start(decoder, draft, prompt, controls, rng, spec, sharding)
        sent = 0
        while True:
            fields = (state.tokens, state.lengths, state.accepted, state.proposed, live)
            tokens, lengths, accepted, proposed, live = (
                x[: self._batch] for x in jax.device_get(fields)
            )  # dummy rows (batch bucket) start finished: they never hold a column back
            self.accepted, self.proposed = int(accepted.sum()), int(proposed.sum())
            if not live.any():  # the rest of the longest row
                ready = int(lengths.max())
            else:  # a live row has its columns up to its length; ended rows have them all
                ready = int(np.min(np.where(live, lengths, spec.max_new_tokens)))
            yield from (tokens[:, t] for t in range(sent, ready))
            sent = max(sent, ready)
            if not live.any():
                return
            state, live = _speculative_step(decoder, draft, controls, state, spec, sharding)
