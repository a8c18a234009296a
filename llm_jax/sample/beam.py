"""Beam search in the canonical shape (flax examples/wmt/decode.py, t5x decoding.py), with
the scores and stopping rules of Hugging Face `generate(num_beams=k, do_sample=False)`.

Per prompt, K = num_beams live hypotheses and K finished ones are kept. One step
(`beam_emit`) composes four sub-steps:

    log p  = log_softmax(logits) (EOS at -inf before min_new_tokens)          [B, K, V]
  expand:
    cand   = live_score + log p, flattened over (beam, token)                 [B, K*V]
    top C  = top_k(cand, C), C = max(2, 1 + #EOS) * K ("2 x beams")           [B, C]
    hit    = token is EOS | completes a stop sequence | last allowed token
  select_live:
    live   <- the K best candidates that did not hit (hits pushed down by 1e9)
  merge_finished:
    finished <- best K of (finished, hits ranked < K among the C), each scored
               sum(log p) / (generated tokens, counting EOS) ** length_penalty
  still_improvable:
    a prompt stops improving once its best live beam, scored at the current length
    (early_stopping=False) or at the maximum length ("never", length_penalty > 0),
    cannot beat its worst finished hypothesis; early_stopping=True stops adding once K
    hypotheses are finished.

The loop ends when no prompt can improve, or (early_stopping=True) every prompt has K
finished hypotheses, or every candidate of the step hit a stop. This is the vectorised
beam search of transformers >= 4.50 (`_beam_search`), step for step, so 4-beam outputs
can be compared token for token. The -1e9 penalties and the initial -1e9 scores of beams
1..K-1 (so that the first step expands beam 0 only) are HF's constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from llm_jax.ops import log_softmax
from llm_jax.sample.decoder import Cache, Decoder, init_cache
from llm_jax.sample.loop import Controls, LoopSpec, Prompt, hits_stop, push_recent, suppress_eos
from llm_jax.sample.strategies import Beam

NEG = -1.0e9  # HF's "dead beam" penalty, added (not assigned) so order among dead is kept.


@struct.dataclass
class BeamState:
    """Beam-search loop state. B prompts, K beams, N = max_new_tokens, W = longest stop."""

    step: Int[Array, ""]  # [] tokens generated so far = column of the next write
    live_tokens: Int[Array, "B K N"]  # [B, K, N] generated tokens of the live beams
    live_log_probs: Float[Array, "B K N"]  # [B, K, N] per-token log p of the live beams
    live_scores: Float[Array, "B K"]  # [B, K] sum of log p, best first; dead beams ~ -1e9
    live_recent: Int[Array, "B K W"]  # [B, K, W] last W tokens, for stop sequences
    positions: Int[Array, " B"]  # [B] position of the newest token (same for all beams)
    finished_tokens: Int[Array, "B K N"]  # [B, K, N] finished hypotheses, pad after the end
    finished_log_probs: Float[Array, "B K N"]  # [B, K, N] their per-token log p
    finished_scores: Float[Array, "B K"]  # [B, K] length-normalised scores, best first
    finished_lengths: Int[Array, "B K"]  # [B, K] generated tokens, counting EOS
    finished_ended: Bool[Array, "B K"]  # [B, K] ended by EOS / stop (not by max length)
    is_finished: Bool[Array, "B K"]  # [B, K] slot holds a real hypothesis (HF is_sent_finished)
    improvable: Bool[Array, " B"]  # [B] HF is_early_stop_heuristic_unsatisfied
    all_hit: Bool[Array, ""]  # [] every candidate of the last step hit a stop
    cache: Cache  # the decoder's cache for the B*K beams, row b*K + k


def gather_beams(x: Array, beam_indices: Int[Array, "B M"]) -> Array:
    """Selects beams along axis 1: out[b, m] = x[b, beam_indices[b, m]].

    Args:
      x: [B, K, ...] per-beam values.
      beam_indices: [B, M] beam of each output slot.

    Returns:
      [B, M, ...].
    """
    index = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _flat_rows(beam_indices: Int[Array, "B M"], num_beams: int) -> Int[Array, " BM"]:
    """Row of beam (b, beam_indices[b, m]) in the flattened [B*K] cache batch."""
    offsets = jnp.arange(beam_indices.shape[0])[:, None] * num_beams
    return (offsets + beam_indices).reshape(-1)


def _length_norm(length: Array | int, length_penalty: float) -> Array:
    return jnp.asarray(length, jnp.float32) ** length_penalty


@struct.dataclass
class Candidates:
    """One step's C best continuations per prompt, best first (C = 2 x beams, or more).

    B prompts, C candidates, N = max_new_tokens, W = longest stop sequence.
    """

    scores: Float[Array, "B C"]  # [B, C] parent's sum of log p + the new token's log p
    beam: Int[Array, "B C"]  # [B, C] parent live beam
    token: Int[Array, "B C"]  # [B, C] the new token
    tokens: Int[Array, "B C N"]  # [B, C, N] parent's tokens with the new one at column step
    log_probs: Float[Array, "B C N"]  # [B, C, N] per-token log p, likewise
    recent: Int[Array, "B C W"]  # [B, C, W] last W tokens, the new one last
    ended: Bool[Array, "B C"]  # [B, C] the new token is EOS or completes a stop sequence
    hit: Bool[Array, "B C"]  # [B, C] ended, or the last token allowed (max length, as HF)


def expand(
    state: BeamState, log_probs: Float[Array, "B K V"], controls: Controls, n: int
) -> Candidates:
    """The top C of all K x V continuations of the live beams, written out in full."""
    b, k, vocab = log_probs.shape
    t = state.step
    cand = (state.live_scores[:, :, None] + log_probs).reshape(b, k * vocab)  # [B, K*V]
    num_cand = min(max(2, 1 + controls.eos_ids.shape[0]) * k, k * vocab)
    scores, index = jax.lax.top_k(cand, num_cand)  # [B, C], best first
    parent = index // vocab  # [B, C]
    token = (index % vocab).astype(jnp.int32)  # [B, C]
    tokens = jax.lax.dynamic_update_slice(
        gather_beams(state.live_tokens, parent), token[:, :, None], (0, 0, t)
    )  # [B, C, N]
    token_lp = jnp.take_along_axis(log_probs.reshape(b, k * vocab), index, axis=1)  # [B, C]
    token_log_probs = jax.lax.dynamic_update_slice(
        gather_beams(state.live_log_probs, parent), token_lp[:, :, None], (0, 0, t)
    )  # [B, C, N]
    recent = push_recent(gather_beams(state.live_recent, parent), token)  # [B, C, W]
    ended = hits_stop(token, recent, controls)  # [B, C]
    return Candidates(
        scores=scores,
        beam=parent,
        token=token,
        tokens=tokens,
        log_probs=token_log_probs,
        recent=recent,
        ended=ended,
        hit=ended | (t + 1 >= n),
    )


def select_live(
    c: Candidates, k: int
) -> tuple[Float[Array, "B K"], Int[Array, "B K"], Int[Array, "B K"]]:
    """The K best candidates that did not stop: (scores, pick into C, parent beam), [B, K]."""
    running = c.scores + jnp.where(c.hit, NEG, 0.0)  # [B, C]
    scores, pick = jax.lax.top_k(running, k)  # [B, K]
    return scores, pick, jnp.take_along_axis(c.beam, pick, axis=1)


def merge_finished(
    state: BeamState, c: Candidates, beam: Beam, generated: Int[Array, ""]
) -> BeamState:
    """Merges the candidates that stopped at rank < K into the best K finished so far.

    A candidate is barred (pushed down by 1e9) when early_stopping=True and the prompt has
    K finished already, or when the prompt can no longer improve.
    """
    k = beam.num_beams
    b, num_cand = c.scores.shape
    normed = c.scores / _length_norm(generated, beam.length_penalty)  # [B, C]
    just_finished = c.hit & (jnp.arange(num_cand) < k)  # [B, C]
    full = jnp.all(state.is_finished, axis=-1, keepdims=True) & (beam.early_stopping is True)
    normed = normed + jnp.where(full, NEG, 0.0)
    normed = normed + jnp.where(state.improvable[:, None], 0.0, NEG)
    normed = normed + jnp.where(just_finished, 0.0, NEG)
    merged_scores = jnp.concatenate([state.finished_scores, normed], axis=1)  # [B, K+C]
    finished_scores, pick = jax.lax.top_k(merged_scores, k)  # [B, K]

    def merge(finished: Array, candidates: Array) -> Array:
        return gather_beams(jnp.concatenate([finished, candidates], axis=1), pick)

    return state.replace(
        finished_tokens=merge(state.finished_tokens, c.tokens),
        finished_log_probs=merge(state.finished_log_probs, c.log_probs),
        finished_scores=finished_scores,
        finished_lengths=merge(state.finished_lengths, jnp.full((b, num_cand), generated)),
        finished_ended=merge(state.finished_ended, c.ended),
        is_finished=merge(state.is_finished, just_finished),
    )


def still_improvable(
    state: BeamState,
    live_scores: Float[Array, "B K"],
    beam: Beam,
    generated: Int[Array, ""],
    n: int,
) -> Bool[Array, " B"]:
    """HF's early-stop heuristic: can the best live beam still beat the worst finished one?

    `state` holds this step's finished hypotheses and the previous step's `improvable`;
    `live_scores` are this step's, best first.
    """
    if beam.early_stopping == "never" and beam.length_penalty > 0.0:
        best_length = n
    else:
        best_length = generated
    best_possible = live_scores[:, :1] / _length_norm(best_length, beam.length_penalty)
    worst_finished = jnp.where(
        state.is_finished, jnp.min(state.finished_scores, axis=-1, keepdims=True), NEG
    )  # [B, K]
    return state.improvable & jnp.any(best_possible > worst_finished, axis=-1)


def beam_emit(
    spec: LoopSpec,
    controls: Controls,
    state: BeamState,
    logits: Float[Array, "BK V"],
    decoder: Decoder,
) -> BeamState:
    """Chooses the next live beams and updates the finished hypotheses from [B*K, V] logits."""
    beam: Beam = spec.strategy  # type: ignore[assignment]
    k, n = beam.num_beams, spec.max_new_tokens
    b = state.live_tokens.shape[0]
    generated = state.step + 1  # tokens generated once this step's token is appended
    log_probs = suppress_eos(log_softmax(logits), controls, state.step)  # [B*K, V]
    c = expand(state, log_probs.reshape(b, k, -1), controls, n)
    live_scores, live_pick, live_parent = select_live(c, k)
    state = merge_finished(state, c, beam, generated)
    return state.replace(
        step=generated,
        live_tokens=gather_beams(c.tokens, live_pick),
        live_log_probs=gather_beams(c.log_probs, live_pick),
        live_scores=live_scores,
        live_recent=gather_beams(c.recent, live_pick),
        positions=state.positions + 1,
        improvable=still_improvable(state, live_scores, beam, generated, n),
        all_hit=jnp.all(c.hit),
        cache=decoder.take_rows(state.cache, _flat_rows(live_parent, k)),
    )


def beam_is_running(spec: LoopSpec, state: BeamState) -> Bool[Array, ""]:
    """HF's `_beam_search_has_unfinished_sequences`, plus the buffer bound."""
    beam: Beam = spec.strategy  # type: ignore[assignment]
    open_beams = ~(jnp.all(state.is_finished) & (beam.early_stopping is True))
    return (
        (state.step < spec.max_new_tokens) & jnp.any(state.improvable) & open_beams & ~state.all_hit
    )


def run_beam_search(
    decoder: Decoder, prompt: Prompt, controls: Controls, spec: LoopSpec
) -> BeamState:
    """The whole beam search: prefill B prompts, copy the cache to K beams each, loop."""
    beam: Beam = spec.strategy  # type: ignore[assignment]
    k, n = beam.num_beams, spec.max_new_tokens
    b = prompt.tokens.shape[0]

    cache = init_cache(
        decoder, b, spec.cache_length, prompt.encoder_tokens, prompt.encoder_segment_ids
    )
    logits, cache = decoder.tokens_to_logits(
        prompt.tokens, prompt.positions, prompt.segment_ids, cache
    )  # [B, T, V]
    cache = decoder.take_rows(cache, jnp.repeat(jnp.arange(b), k))  # b*K .. b*K+K-1: prompt b
    first_logits = jnp.repeat(logits[:, -1], k, axis=0)  # [B*K, V]

    pad = controls.pad_id
    width = controls.stop_sequences.shape[1]
    live_scores = jnp.where(jnp.arange(k) == 0, 0.0, NEG) * jnp.ones((b, 1), jnp.float32)
    state = BeamState(
        step=jnp.zeros((), jnp.int32),
        live_tokens=jnp.full((b, k, n), pad, jnp.int32),
        live_log_probs=jnp.zeros((b, k, n), jnp.float32),
        live_scores=live_scores,
        live_recent=jnp.full((b, k, width), -1, jnp.int32),
        positions=prompt.lengths.astype(jnp.int32) - 1,
        finished_tokens=jnp.full((b, k, n), pad, jnp.int32),
        finished_log_probs=jnp.zeros((b, k, n), jnp.float32),
        finished_scores=jnp.full((b, k), NEG, jnp.float32),
        finished_lengths=jnp.zeros((b, k), jnp.int32),
        finished_ended=jnp.zeros((b, k), bool),
        is_finished=jnp.zeros((b, k), bool),
        improvable=jnp.ones((b,), bool),
        all_hit=jnp.zeros((), bool),
        cache=cache,
    )
    state = beam_emit(spec, controls, state, first_logits, decoder)

    def body(state: BeamState) -> BeamState:
        newest = jax.lax.dynamic_slice_in_dim(state.live_tokens, state.step - 1, 1, axis=2)
        newest = newest.reshape(b * k, 1)  # [B*K, 1]
        positions = jnp.repeat(state.positions, k)[:, None]  # [B*K, 1]
        logits, cache = decoder.tokens_to_logits(
            newest, positions, jnp.ones_like(newest), state.cache
        )  # [B*K, 1, V]
        return beam_emit(spec, controls, state.replace(cache=cache), logits[:, 0], decoder)

    return jax.lax.while_loop(lambda s: beam_is_running(spec, s), body, state)


def beam_output_fields(spec: LoopSpec, state: BeamState) -> dict[str, Array | None]:
    """The best `num_return_sequences` finished hypotheses of every prompt, best first."""
    beam: Beam = spec.strategy  # type: ignore[assignment]
    r = beam.num_return_sequences
    return {
        "tokens": state.finished_tokens[:, :r],
        "lengths": state.finished_lengths[:, :r],
        "finished": state.finished_ended[:, :r],
        "log_probs": state.finished_log_probs[:, :r] if spec.return_log_probs else None,
        "scores": state.finished_scores[:, :r],
    }
