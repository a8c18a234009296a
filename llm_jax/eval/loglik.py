"""Log-likelihood scoring: the one device computation behind perplexity, multiple choice and
cloze (lm-evaluation-harness's `loglikelihood` request).

A `Request` is a (context, continuation) pair of token ids; its `Score` is the summed
log-probability of the continuation's tokens given the context and everything before them,
the number of those tokens, and whether greedy decoding would have produced exactly the
continuation (every continuation token is the argmax at its position).

Decoder-only models read `context + continuation` as one row: tokens = seq[:-1],
targets = seq[1:], weights 1 on the continuation's targets. The context must hold at least
one token (callers put a BOS/EOS "prefix" token in front of an empty context, as
lm-evaluation-harness does). Encoder–decoders read the context as the encoder input and
score the continuation as the decoder's teacher-forced targets after the start token.

Requests are sorted longest first and cut into batches of `batch_size` rows, each padded to
a power-of-two bucket (`llm_jax.sample.generate.bucket_length`) capped at the model's
length, so a run compiles once per bucket; padding rows have weight 0.

Shape letters: B batch, T tokens (decoder / decoder-only row), S encoder tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from llm_jax.sample.generate import bucket_length


@dataclasses.dataclass(frozen=True)
class Request:
    """Score `continuation` after `context` (int token ids)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @classmethod
    def of(cls, context: Sequence[int], continuation: Sequence[int]) -> Request:
        return cls(tuple(int(i) for i in context), tuple(int(i) for i in continuation))


@dataclasses.dataclass(frozen=True)
class Score:
    """log p(continuation | context) summed over its `num_tokens` tokens; `is_greedy`: every
    continuation token is the model's argmax at its position."""

    loglikelihood: float
    num_tokens: int
    is_greedy: bool


def model_length(model: Any) -> int:
    """The longest sequence the model takes (a learned or sinusoidal table's rows, less a
    soft prompt's P; RoPE and relative positions: the configured max_position_embeddings)."""
    cfg = model.cfg
    return cfg.max_position_embeddings - cfg.prompt_length


def is_encoder_decoder(model: Any) -> bool:
    return model.cfg.family == "t5"


def check_requests(requests: Sequence[Request], *, max_length: int, encoder_decoder: bool) -> None:
    """ValueError naming the first request that cannot be scored, before any compilation."""
    for i, r in enumerate(requests):
        if not r.continuation:
            raise ValueError(f"request {i}: the continuation tokenizes to nothing.")
        if encoder_decoder:
            if len(r.context) > max_length or len(r.continuation) > max_length:
                raise ValueError(
                    f"request {i}: context of {len(r.context)} and continuation of "
                    f"{len(r.continuation)} tokens; the model takes at most {max_length} each."
                )
            continue
        if not r.context:
            raise ValueError(
                f"request {i}: a decoder-only model needs at least one context token (a BOS "
                "or EOS prefix) to score the continuation's first token."
            )
        n = len(r.context) + len(r.continuation) - 1
        if n > max_length:
            raise ValueError(
                f"request {i}: context + continuation is {n + 1} tokens; the model reads at "
                f"most {max_length + 1} (its {max_length} positions); shorten the prompt (fewer "
                "--shots), or for perplexity use a sliding window (--stride)."
            )


# Packing (NumPy, pure) -----------------------------------------------------------------------


def pack_decoder_only(requests: Sequence[Request], T: int, B: int) -> dict[str, np.ndarray]:
    """Rows of `context + continuation` (right-padded to T, B rows; missing rows all padding).

    Returns:
      tokens, targets, segment_ids, positions int32 [B, T]; weights float32 [B, T] (1 on the
      continuation's targets).
    """
    out = {k: np.zeros((B, T), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    out["weights"] = np.zeros((B, T), np.float32)
    for i, r in enumerate(requests):
        seq = np.asarray(r.context + r.continuation, np.int32)
        n = len(seq) - 1
        out["tokens"][i, :n], out["targets"][i, :n] = seq[:-1], seq[1:]
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
        out["weights"][i, len(r.context) - 1 : n] = 1.0
    return out


def pack_encoder_decoder(
    requests: Sequence[Request], S: int, T: int, B: int, start_id: int
) -> dict[str, np.ndarray]:
    """Contexts as encoder rows [B, S]; continuations as teacher-forced decoder rows [B, T]
    (decoder input = start token + continuation[:-1])."""
    out = {
        k: np.zeros((B, S), np.int32)
        for k in ("encoder_tokens", "encoder_segment_ids", "encoder_positions")
    }
    out |= {
        k: np.zeros((B, T), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")
    }
    out["weights"] = np.zeros((B, T), np.float32)
    for i, r in enumerate(requests):
        s, n = len(r.context), len(r.continuation)
        out["encoder_tokens"][i, :s] = r.context
        out["encoder_segment_ids"][i, :s] = 1
        out["encoder_positions"][i, :s] = np.arange(s)
        out["tokens"][i, :n] = (start_id, *r.continuation[:-1])
        out["targets"][i, :n] = r.continuation
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
        out["weights"][i, :n] = 1.0
    return out


# Device side ---------------------------------------------------------------------------------


def target_scores(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"], weights: Float[Array, "B T"]
) -> tuple[Float[Array, " B"], Bool[Array, " B"]]:
    """(sum over weighted positions of log softmax(logits)[target], all weighted targets are
    the argmax). The log-softmax is never materialised: target logit - logsumexp."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    token_ll = picked - jax.nn.logsumexp(logits, axis=-1)  # [B, T]
    ll = jnp.sum(token_ll * weights, axis=-1)
    hit = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return ll, jnp.all(hit, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score_batch(
    params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
) -> tuple[Float[Array, " B"], Bool[Array, " B"]]:
    """`target_scores` of one packed batch (decoder-only or encoder–decoder)."""
    model = nnx.merge(graphdef, params)
    if "encoder_tokens" in batch:
        logits = model(
            batch["encoder_tokens"],
            batch["tokens"],
            encoder_segment_ids=batch["encoder_segment_ids"],
            encoder_positions=batch["encoder_positions"],
            decoder_segment_ids=batch["segment_ids"],
            decoder_positions=batch["positions"],
        )
    else:
        logits = model(
            batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
    return target_scores(logits, batch["targets"], batch["weights"])


# Host side -----------------------------------------------------------------------------------


def _bucket(n: int, limit: int) -> int:
    return bucket_length(max(n, 1), limit)


def loglikelihood(
    model: Any,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    decoder_start_id: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[Score]:
    """Scores of `requests`, in their order.

    Args:
      model: a GPT (decoder-only) or T5 (encoder–decoder) model.
      requests: the (context, continuation) pairs.
      batch_size: rows per compiled call.
      max_length: positions available (default `model_length(model)`).
      decoder_start_id: encoder–decoders: the decoder's first input (T5: 0).
      on_batch: called after each batch with (requests scored in it, tokens scored in it).

    Raises:
      ValueError: a request that cannot be scored (see `check_requests`), before compiling.
    """
    limit = model_length(model) if max_length is None else max_length
    enc_dec = is_encoder_decoder(model)
    check_requests(requests, max_length=limit, encoder_decoder=enc_dec)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    graphdef, params = nnx.split(model)
    order = sorted(
        range(len(requests)), key=lambda i: -len(requests[i].context + requests[i].continuation)
    )
    scores: list[Score | None] = [None] * len(requests)
    for lo in range(0, len(order), batch_size):
        rows = [requests[i] for i in order[lo : lo + batch_size]]
        if enc_dec:
            S = _bucket(max(len(r.context) for r in rows), limit)
            T = _bucket(max(len(r.continuation) for r in rows), limit)
            batch = pack_encoder_decoder(rows, S, T, batch_size, decoder_start_id)
        else:
            T = _bucket(max(len(r.context) + len(r.continuation) - 1 for r in rows), limit)
            batch = pack_decoder_only(rows, T, batch_size)
        ll, greedy = jax.device_get(score_batch(params, batch, graphdef=graphdef))
        for j, (i, r) in enumerate(zip(order[lo : lo + batch_size], rows, strict=True)):
            scores[i] = Score(float(ll[j]), len(r.continuation), bool(greedy[j]))
        if on_batch is not None:
            on_batch(len(rows), sum(len(r.continuation) for r in rows))
    return scores  # type: ignore[return-value]


def rolling_requests(
    ids: Sequence[int], prefix_id: int | None, max_length: int, stride: int
) -> list[Request]:
    """Sliding windows that score every token of `ids` once (the Hugging Face perplexity
    recipe).

    The sequence is `[prefix_id] + ids` (no prefix: the first token is not scored). Window
    k starts at k * stride and holds up to `max_length + 1` tokens (`max_length` positions
    of input); it scores only the tokens no earlier window scored, conditioned on the rest
    of the window, so with stride < max_length each scored token sees at least
    `max_length - stride` tokens of context. When the sequence fits one window the result is
    the full-context score.

    Args:
      ids: the document's tokens.
      prefix_id: a BOS/EOS token to predict the first token from; None scores from token 1.
      max_length: input positions per window (the model's length).
      stride: how far a window moves; 1 <= stride <= max_length.
    """
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}]; got {stride}.")
    seq = ([prefix_id] if prefix_id is not None else []) + [int(i) for i in ids]
    out, scored_to, begin = [], 1, 0
    while scored_to < len(seq):
        end = min(begin + max_length + 1, len(seq))
        if end > scored_to:
            out.append(Request.of(seq[begin:scored_to], seq[scored_to:end]))
            scored_to = end
        begin += stride
    return out
