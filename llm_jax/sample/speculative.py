"""Speculative decoding: a small draft proposes k tokens, the target checks them in one call.

    prefill:  both caches <- prompt;  token 0 <- the target's choice (as in `loop.prefill`)
    round:    draft:  d_1..d_k from k + 1 one-token calls on x, d_1, .., d_k (x = the row's
                      newest token; the last call only writes d_k into the draft's cache)
              target: logits p_0..p_k of one call on [x, d_1, .., d_k]  (T = k + 1)
              accept the longest prefix d_1..d_a the target agrees with, then one token from
              p_a: a + 1 new tokens per row, 1 to k + 1; rewind both caches to them

Greedy: d_j is accepted when it is the target's argmax and the extra token is the target's
argmax at p_a, so the output is the target's own greedy decoding, token for token. Sampling
(Leviathan et al. 2023, Chen et al. 2023): d_j ~ q_j is accepted with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection the token is drawn from
norm(max(0, p - q)), and when all k are accepted from p_k, so every emitted token has the
target's (filtered) distribution p whatever the draft.

Rows accept different numbers of tokens, but a decoder's cache has one write index for the
whole batch (see `llm_jax.sample.decoder`). The caches therefore advance by the longest
accepted run among the live rows, and the other rows' unused slots become holes: the
decoder's `rewind(cache, index, keep_end)` marks every slot from keep_end[b] on empty, so
attention skips the holes as it skips left padding; positions are per row, so a hole
changes nothing else. Holes cost slots: the index moves at most k + 1 per round and at most
as far as the live rows' tokens, so the cache holds the prompt bucket plus
min((k + 1) N, B N) + k + 1 slots (`cache_length`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from llm_jax.ops import log_softmax, softmax
from llm_jax.sample.decoder import Cache, Decoder, init_cache
from llm_jax.sample.loop import Controls, LoopSpec, Prompt, hits_stop, prefill, push_recent
from llm_jax.sample.sampling import filter_logits
from llm_jax.sample.strategies import Greedy, Sample


def cache_length(prompt_length: int, max_new_tokens: int, batch_size: int, k: int) -> int:
    """Cache slots a speculative call needs: the prompt, the holes' bound and one block."""
    n = max_new_tokens
    return prompt_length + min((k + 1) * n, batch_size * n) + k + 1


@struct.dataclass
class SpeculativeState:
    """Loop state of speculative decoding. N = max_new_tokens, W = longest stop sequence."""

    tokens: Int[Array, "B N"]  # [B, N] generated tokens, pad_id after a row's end
    log_probs: Float[Array, "B N"] | None  # [B, N] log p(token) under the target, or None
    positions: Int[Array, " B"]  # [B] position of each row's newest token
    last_position: Int[Array, " B"]  # [B] position of token N - 1, the last one ever kept
    lengths: Int[Array, " B"]  # [B] generated tokens per row, counting the EOS/stop token
    done: Bool[Array, " B"]  # [B] the row ended with EOS or a stop sequence
    recent: Int[Array, "B W"]  # [B, W] the last W generated tokens (-1 before the first)
    index: Int[Array, ""]  # [] the caches' shared write index (next free slot)
    cache: Cache  # the target's cache
    draft_cache: Cache  # the draft's cache, same slot layout
    rng: jax.Array | None  # PRNG key; None for greedy
    rounds: Int[Array, ""]  # [] verification rounds run
    accepted: Int[Array, " B"]  # [B] draft tokens the target accepted
    proposed: Int[Array, " B"]  # [B] draft tokens proposed to the row while it was live


def live_rows(spec: LoopSpec, state: SpeculativeState) -> Bool[Array, " B"]:
    """[B] rows that still generate (no EOS / stop sequence yet, under max_new_tokens)."""
    return ~state.done & (state.lengths < spec.max_new_tokens)


def _suppress_eos(
    logits: Float[Array, "... V"], controls: Controls, steps: Int[Array, "..."]
) -> Float[Array, "... V"]:
    """EOS at -inf where fewer than min_new_tokens tokens precede (per row and position)."""
    is_eos = jnp.isin(jnp.arange(logits.shape[-1]), controls.eos_ids)  # [V]
    return jnp.where(is_eos & (steps[..., None] < controls.min_new_tokens), -jnp.inf, logits)


def filtered_probs(logits: Float[Array, "... V"], strategy: Sample) -> Float[Array, "... V"]:
    """The distribution `Sample` draws from, over the whole vocabulary (0 off the filters)."""
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])  # [B', V]
    candidates, ids = filter_logits(flat, strategy.temperature, strategy.top_k, strategy.top_p)
    probs = softmax(candidates, axis=-1)  # [B', C]
    if ids is not None:
        probs = jnp.zeros_like(flat).at[jnp.arange(flat.shape[0])[:, None], ids].set(probs)
    return probs.reshape(shape)


def _choose(
    strategy: Greedy | Sample, logits: Float[Array, "B V"], key: jax.Array | None
) -> tuple[Int[Array, " B"], Float[Array, "B V"] | None]:
    """A token per row and, for sampling, the distribution it was drawn from."""
    if isinstance(strategy, Greedy):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    probs = filtered_probs(logits, strategy)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32), probs


def propose(
    draft: Decoder,
    controls: Controls,
    spec: LoopSpec,
    state: SpeculativeState,
    newest: Int[Array, " B"],
    key: jax.Array | None,
) -> tuple[Int[Array, "B K"], Float[Array, "B K V"] | None, Cache]:
    """k draft tokens per row from k + 1 one-token draft calls (K = k here).

    The last call only writes d_k into the draft's cache, so that after a fully accepted
    round the draft's cache holds every accepted token like the target's.

    Returns:
      (drafts [B, k], their distributions q [B, k, V] (None for greedy), draft cache).
    """
    k = spec.speculate_k
    cache, token = state.draft_cache, newest
    drafts, probs = [], []
    # Unrolled (k + 1 is small): a scan would carry, and on XLA:CPU copy, the whole cache.
    for j in range(k + 1):
        logits, cache = draft.tokens_to_logits(
            token[:, None],
            jnp.minimum(state.positions + j, state.last_position)[:, None],
            jnp.ones_like(token)[:, None],
            cache,
        )  # [B, 1, V]
        if j == k:
            break  # this call only writes d_k into the cache
        logits = _suppress_eos(logits[:, 0].astype(jnp.float32), controls, state.lengths + j)
        token, q = _choose(
            spec.strategy, logits, None if key is None else jax.random.fold_in(key, j)
        )
        drafts.append(token)
        probs.append(q)
    drafts = jnp.stack(drafts, axis=1)  # [B, k]
    probs = None if probs[0] is None else jnp.stack(probs, axis=1)  # [B, k, V]
    return drafts, probs, cache


def accept(
    strategy: Greedy | Sample,
    drafts: Int[Array, "B K"],
    q: Float[Array, "B K V"] | None,
    logits: Float[Array, "B T V"],
    key: jax.Array | None,
) -> tuple[Int[Array, " B"], Int[Array, "B T"]]:
    """How many draft tokens each row accepts, and the row's new tokens (T = K + 1).

    Args:
      strategy: Greedy or Sample.
      drafts: d_1..d_k [B, k].
      q: the draft's distributions of d_1..d_k [B, k, V] (sampling), else None.
      logits: the target's logits p_0..p_k [B, k + 1, V], EOS already suppressed.
      key: PRNG key (sampling).

    Returns:
      (a [B] accepted draft tokens, block [B, k + 1]: d_1..d_a then the extra token at
      column a; the columns after a are meaningless).
    """
    b, k = drafts.shape
    if isinstance(strategy, Greedy):
        target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, k + 1]
        agree = drafts == target[:, :k]
        a = jnp.sum(jnp.cumprod(agree, axis=1), axis=1)  # [B]
        extra = jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
    else:
        accept_key, extra_key = jax.random.split(key)
        p = filtered_probs(logits, strategy)  # [B, k + 1, V]
        p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, k]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]  # [B, k], > 0
        u = jax.random.uniform(accept_key, (b, k))
        a = jnp.sum(jnp.cumprod(u * q_d < p_d, axis=1), axis=1)  # [B]
        p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]  # [B, V]
        q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # [B, k + 1, V]
        q_a = jnp.take_along_axis(q_pad, a[:, None, None], axis=1)[:, 0]  # 0 when a = k
        residual = jnp.maximum(p_a - q_a, 0.0)
        # Rounding can leave no mass where p and q agree; p itself is then the right law.
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
        extra = jax.random.categorical(extra_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    columns = jnp.arange(k + 1)
    padded = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], axis=1)  # [B, k + 1]
    return a.astype(jnp.int32), jnp.where(columns == a[:, None], extra[:, None], padded)


def append_block(
    spec: LoopSpec,
    controls: Controls,
    state: SpeculativeState,
    block: Int[Array, "B T"],
    count: Int[Array, " B"],
    block_log_probs: Float[Array, "B T"] | None,
) -> SpeculativeState:
    """Appends the first count[b] tokens of block[b] to each live row, one column at a time
    (an EOS or a stop sequence can end a row inside the block, and N caps it)."""
    rows = jnp.arange(block.shape[0])
    n = spec.max_new_tokens
    tokens, log_probs, recent = state.tokens, state.log_probs, state.recent
    lengths, done = state.lengths, state.done
    for j in range(block.shape[1]):  # k + 1 columns: a short, unrolled loop
        live = ~done & (j < count) & (lengths < n)
        token = block[:, j]
        column = jnp.where(live, lengths, n)  # column n is out of range: dropped
        tokens = tokens.at[rows, column].set(token, mode="drop")
        if log_probs is not None:
            log_probs = log_probs.at[rows, column].set(block_log_probs[:, j], mode="drop")
        recent = jnp.where(live[:, None], push_recent(recent, token), recent)
        done = done | (live & hits_stop(token, recent, controls))
        lengths = lengths + live
    return state.replace(
        tokens=tokens, log_probs=log_probs, recent=recent, lengths=lengths, done=done
    )


def speculative_round(
    target: Decoder,
    draft: Decoder,
    controls: Controls,
    spec: LoopSpec,
    state: SpeculativeState,
) -> SpeculativeState:
    """One round: propose k, verify k + 1 in one target call, append, rewind both caches."""
    k = spec.speculate_k
    live = live_rows(spec, state)
    newest = jnp.take_along_axis(state.tokens, jnp.maximum(state.lengths - 1, 0)[:, None], 1)[:, 0]
    key = None if state.rng is None else jax.random.fold_in(state.rng, state.rounds + 1)
    draft_key, accept_key = (None, None) if key is None else jax.random.split(key)
    drafts, q, draft_cache = propose(draft, controls, spec, state, newest, draft_key)

    inputs = jnp.concatenate([newest[:, None], drafts], axis=1)  # [B, k + 1]
    offsets = jnp.arange(k + 1)
    # Positions past token N - 1 belong to tokens that are never kept; clipping keeps them
    # inside a learned position table (whose out-of-range rows would be NaN, and a NaN
    # value in a hole would leak through attention's zero weights).
    positions = jnp.minimum(state.positions[:, None] + offsets, state.last_position[:, None])
    raw, cache = target.tokens_to_logits(
        inputs, positions, jnp.ones_like(inputs), state.cache
    )  # [B, k + 1, V]
    raw = raw.astype(jnp.float32)
    logits = _suppress_eos(raw, controls, state.lengths[:, None] + offsets)
    a, block = accept(spec.strategy, drafts, q, logits, accept_key)

    block_log_probs = None
    if state.log_probs is not None:
        block_log_probs = jnp.take_along_axis(log_softmax(raw), block[..., None], -1)[..., 0]
    state = append_block(spec, controls, state, block, a + 1, block_log_probs)
    # Row b keeps its newest token and its a accepted drafts (slots index..index+a); the
    # index moves past the longest such run among the rows that go on.
    keep_end = state.index + a + 1
    advance = jnp.max(jnp.where(live_rows(spec, state), a + 1, 0))
    index = state.index + advance
    return state.replace(
        positions=state.positions + a + 1,
        index=index,
        cache=target.rewind(cache, index, keep_end),
        draft_cache=draft.rewind(draft_cache, index, keep_end),
        rounds=state.rounds + 1,
        accepted=state.accepted + jnp.where(live, a, 0),
        proposed=state.proposed + jnp.where(live, k, 0),
    )


def start_speculative(
    target: Decoder,
    draft: Decoder,
    prompt: Prompt,
    controls: Controls,
    rng: jax.Array | None,
    spec: LoopSpec,
) -> SpeculativeState:
    """Both prefills: token 0 from the target, the draft's cache filled with the prompt."""
    first = prefill(target, prompt, controls, rng, spec)  # token 0 from the target
    batch = prompt.tokens.shape[0]
    draft_cache = init_cache(
        draft, batch, spec.cache_length, prompt.encoder_tokens, prompt.encoder_segment_ids
    )
    _, draft_cache = draft.tokens_to_logits(
        prompt.tokens, prompt.positions, prompt.segment_ids, draft_cache
    )
    zeros = jnp.zeros((batch,), jnp.int32)
    state = SpeculativeState(
        tokens=first.tokens,
        log_probs=first.log_probs,
        positions=first.positions,
        last_position=prompt.lengths.astype(jnp.int32) + spec.max_new_tokens - 1,
        lengths=first.lengths,
        done=first.done,
        recent=first.recent,
        index=jnp.asarray(prompt.tokens.shape[1], jnp.int32),
        cache=first.cache,
        draft_cache=draft_cache,
        rng=rng,
        rounds=jnp.zeros((), jnp.int32),
        accepted=zeros,
        proposed=zeros,
    )
    return state


def run_speculative(
    target: Decoder,
    draft: Decoder,
    prompt: Prompt,
    controls: Controls,
    rng: jax.Array | None,
    spec: LoopSpec,
) -> SpeculativeState:
    """The whole speculative generation: both prefills, then `lax.while_loop` of rounds."""
    return jax.lax.while_loop(
        lambda s: jnp.any(live_rows(spec, s)),
        lambda s: speculative_round(target, draft, controls, spec, s),
        start_speculative(target, draft, prompt, controls, rng, spec),
    )


def speculative_output_fields(state: SpeculativeState) -> dict[str, Any]:
    """The user-facing fields of a finished `SpeculativeState`."""
    return {
        "tokens": state.tokens,
        "lengths": state.lengths,
        "finished": state.done,
        "log_probs": state.log_probs,
        "draft_accepted": state.accepted,
        "draft_proposed": state.proposed,
    }
