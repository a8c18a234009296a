"""The greedy / sampling decode loop: a pure step over a named `SamplingState`.

    prefill:  cache <- decoder(prompt [B, T]);      token 0 <- choose(logits[:, -1])
    step t:   cache <- decoder(token t-1 [B, 1]);  token t <- choose(logits[:, 0])
    until every row has ended (EOS / stop sequence) or N = max_new_tokens tokens exist.

`run_sampling` is the whole generation inside one `lax.while_loop`; `prefill` and
`decode_step` are the same pieces exposed for the streaming generator, which jits them
separately and drives the steps from Python. Everything here is traced; the host-side
checks and padding live in `llm_jax.sample.generate`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from llm_jax.ops import log_softmax
from llm_jax.sample.decoder import Cache, Decoder, init_cache
from llm_jax.sample.sampling import choose_token
from llm_jax.sample.strategies import Beam, Greedy, Sample


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """The static (shape- or program-changing) part of a generation call.

    Attributes:
      strategy: Greedy, Sample or Beam.
      max_new_tokens: N, the width of the output buffers.
      cache_length: slots in the cache: prompt bucket + N.
      return_log_probs: also carry the per-token log-prob buffer.
      speculate_k: > 0: speculative decoding with a draft proposing this many tokens per
        round (`strategy` is then Greedy or Sample; see `llm_jax.sample.speculative`).
    """

    strategy: Greedy | Sample | Beam
    max_new_tokens: int
    cache_length: int
    return_log_probs: bool = False
    speculate_k: int = 0


@struct.dataclass
class Prompt:
    """The padded prompt batch, built on the host by `generate` (see `pad_prompts`)."""

    tokens: Int[Array, "B T"]  # decoder prompt, left-padded with pad_id
    positions: Int[Array, "B T"]  # 0.. for real tokens, 0 on padding
    segment_ids: Int[Array, "B T"]  # 1 real, 0 padding
    lengths: Int[Array, " B"]  # real decoder-prompt tokens per row
    encoder_tokens: Int[Array, "B S"] | None = None  # encoder input, right-padded
    encoder_segment_ids: Int[Array, "B S"] | None = None  # 1 real, 0 padding
    dummy: Bool[Array, " B"] | None = None  # rows that only fill the batch bucket


@struct.dataclass
class Controls:
    """Per-call values the loop reads; traced, so changing them does not recompile."""

    eos_ids: Int[Array, " E"]  # tokens that end a row (E may be 0)
    stop_sequences: Int[Array, "S W"]  # right-aligned token sequences, -1 = no token
    min_new_tokens: Int[Array, ""]  # EOS is forbidden while fewer tokens were generated
    pad_id: Int[Array, ""]  # fills the output after a row ends


@struct.dataclass
class SamplingState:
    """Loop state of greedy and sampling decoding. N = max_new_tokens, W = longest stop."""

    step: Int[Array, ""]  # [] tokens generated so far = column of the next write
    tokens: Int[Array, "B N"]  # [B, N] generated tokens, pad_id after a row's end
    log_probs: Float[Array, "B N"] | None  # [B, N] log p(token) under the model, 0 after end
    positions: Int[Array, " B"]  # [B] position of each row's newest token
    lengths: Int[Array, " B"]  # [B] generated tokens per row, counting the EOS/stop token
    done: Bool[Array, " B"]  # [B] the row ended with EOS or a stop sequence
    recent: Int[Array, "B W"]  # [B, W] the last W generated tokens (-1 before the first)
    cache: Cache  # the decoder's cache for the B rows
    rng: jax.Array | None  # PRNG key; None for greedy


def suppress_eos(
    logits: Float[Array, "... V"], controls: Controls, step: Int[Array, ""]
) -> Float[Array, "... V"]:
    """Sets the EOS logits to -inf while fewer than min_new_tokens tokens were generated."""
    vocab = jnp.arange(logits.shape[-1])
    is_eos = jnp.isin(vocab, controls.eos_ids)  # [V]
    return jnp.where(is_eos & (step < controls.min_new_tokens), -jnp.inf, logits)


def push_recent(recent: Int[Array, "... W"], token: Int[Array, "..."]) -> Int[Array, "... W"]:
    """Shifts `token` into the window of the last W generated tokens."""
    if recent.shape[-1] == 0:
        return recent
    return jnp.concatenate([recent[..., 1:], token[..., None]], axis=-1)


def hits_stop(
    token: Int[Array, "..."], recent: Int[Array, "... W"], controls: Controls
) -> Bool[Array, "..."]:
    """True where the newest token is an EOS or completes one of the stop sequences.

    `recent` already holds `token` as its last entry. Stop sequences are right-aligned in
    [S, W] with -1 on the left, which matches anything, so a sequence of length l compares
    the last l generated tokens; -1 in `recent` (before the first token) never matches a
    real token, so the prompt never completes a stop sequence.
    """
    hit = jnp.isin(token, controls.eos_ids)
    stops = controls.stop_sequences  # [S, W]
    if stops.shape[0] and stops.shape[1]:
        same = (recent[..., None, :] == stops) | (stops < 0)  # [..., S, W]
        hit = hit | jnp.any(jnp.all(same, axis=-1), axis=-1)
    return hit


def emit(
    spec: LoopSpec, controls: Controls, state: SamplingState, logits: Float[Array, "B V"]
) -> SamplingState:
    """Chooses token `step` of every live row from its logits and records it."""
    t = state.step
    logits = logits.astype(jnp.float32)
    key = None if state.rng is None else jax.random.fold_in(state.rng, t)
    token = choose_token(spec.strategy, suppress_eos(logits, controls, t), key)  # [B]
    token = jnp.where(state.done, controls.pad_id, token)
    tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, t))
    log_probs = state.log_probs
    if log_probs is not None:
        token_lp = jnp.take_along_axis(log_softmax(logits), token[:, None], axis=-1)
        token_lp = jnp.where(state.done[:, None], 0.0, token_lp)  # [B, 1]
        log_probs = jax.lax.dynamic_update_slice(log_probs, token_lp, (0, t))
    recent = push_recent(state.recent, token)
    ended = ~state.done & hits_stop(token, recent, controls)
    return state.replace(
        step=t + 1,
        tokens=tokens,
        log_probs=log_probs,
        positions=state.positions + 1,
        lengths=jnp.where(state.done, state.lengths, t + 1),
        done=state.done | ended,
        recent=recent,
    )


def prefill(
    decoder: Decoder,
    prompt: Prompt,
    controls: Controls,
    rng: jax.Array | None,
    spec: LoopSpec,
) -> SamplingState:
    """Runs the prompt through the decoder in one call and chooses the first token."""
    batch = prompt.tokens.shape[0]
    cache = init_cache(
        decoder, batch, spec.cache_length, prompt.encoder_tokens, prompt.encoder_segment_ids
    )
    logits, cache = decoder.tokens_to_logits(
        prompt.tokens, prompt.positions, prompt.segment_ids, cache
    )  # [B, T, V]
    n = spec.max_new_tokens
    state = SamplingState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((batch, n), controls.pad_id, jnp.int32),
        log_probs=jnp.zeros((batch, n), jnp.float32) if spec.return_log_probs else None,
        positions=prompt.lengths.astype(jnp.int32) - 1,
        lengths=jnp.zeros((batch,), jnp.int32),
        # Rows that only fill the batch bucket start finished, so they never keep the loop going.
        done=jnp.zeros((batch,), bool) if prompt.dummy is None else prompt.dummy,
        recent=jnp.full((batch, controls.stop_sequences.shape[1]), -1, jnp.int32),
        cache=cache,
        rng=rng,
    )
    return emit(spec, controls, state, logits[:, -1])


def decode_step(
    decoder: Decoder, controls: Controls, spec: LoopSpec, state: SamplingState
) -> SamplingState:
    """Feeds every row's newest token to the decoder and chooses the next one."""
    newest = jax.lax.dynamic_slice_in_dim(state.tokens, state.step - 1, 1, axis=1)  # [B, 1]
    logits, cache = decoder.tokens_to_logits(
        newest, state.positions[:, None], jnp.ones_like(newest), state.cache
    )  # [B, 1, V]
    return emit(spec, controls, state.replace(cache=cache), logits[:, 0])


def is_running(spec: LoopSpec, state: SamplingState) -> Bool[Array, ""]:
    """The loop goes on while a row is live and the output buffer has room."""
    return (state.step < spec.max_new_tokens) & ~jnp.all(state.done)


def run_sampling(
    decoder: Decoder,
    prompt: Prompt,
    controls: Controls,
    rng: jax.Array | None,
    spec: LoopSpec,
) -> SamplingState:
    """The whole greedy / sampling generation: prefill, then `lax.while_loop` of steps."""
    state = prefill(decoder, prompt, controls, rng, spec)
    return jax.lax.while_loop(
        lambda s: is_running(spec, s),
        lambda s: decode_step(decoder, controls, spec, s),
        state,
    )


def output_fields(state: SamplingState) -> dict[str, Any]:
    """The user-facing fields of a finished `SamplingState`."""
    return {
        "tokens": state.tokens,
        "lengths": state.lengths,
        "finished": state.done,
        "log_probs": state.log_probs,
    }
