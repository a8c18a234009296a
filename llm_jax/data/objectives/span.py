"""T5 span corruption: raw chunks of the documents, random spans of each replaced by
sentinels in the encoder input and spelled out after their sentinel in the decoder target.

Batch: the encoder-decoder batch of `seq2seq` (encoder rows [B, T], decoder rows [B, S]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from llm_jax.data import packing
from llm_jax.data.objectives.base import (
    STREAM_NOISE,
    ObjectiveSpec,
    RowSpec,
    Source,
    Split,
    example_rng,
    read_docs,
)
from llm_jax.data.objectives.seq2seq import decoder_side, enc_dec_spec

if TYPE_CHECKING:
    from llm_jax.data.config import DataConfig

# Pure builders ---------------------------------------------------------------------------------


def noise_counts(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(noise tokens, noise spans) that `random_spans_noise_mask` uses for `length` tokens.

    As in T5: round(length * density) noise tokens, clamped to [1, length-1], in
    round(noise / mean) spans (at least 1; at most as many as there are noise and
    non-noise tokens, which only binds for densities far above T5's).
    """
    length = max(length, 2)
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_noise_span_length), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def span_corruption_lengths(
    length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
    """(inputs, targets) lengths of span corruption on `length` tokens, EOS included."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    if length < 2:
        return length + 1, 1
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_raw_length(
    inputs_length: int,
    targets_length: int | None = None,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
) -> tuple[int, int]:
    """T5's `random_spans_helper`: the longest raw chunk whose corrupted inputs fit
    `inputs_length` (and targets fit `targets_length` if given).

    Returns:
        (raw tokens per chunk, targets length that chunk produces), e.g. (568, 114) for 512.
    """
    best = None
    n = 2
    while True:
        inp, tgt = span_corruption_lengths(n, noise_density, mean_noise_span_length)
        if inp > inputs_length or (targets_length is not None and tgt > targets_length):
            break
        best = (n, tgt)
        n += 1
    if best is None:
        raise ValueError(
            f"seq_len={inputs_length} / target_seq_len={targets_length} cannot hold even a "
            "2-token span-corruption example; make them larger."
        )
    return best


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Random partition of num_items into num_segments non-empty parts (lengths [segments])."""
    first = np.zeros(num_items, bool)
    first[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    segment = np.cumsum(first)
    return np.bincount(segment, minlength=num_segments)


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_noise_span_length: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """T5's noise mask: alternating non-noise / noise spans, starting with non-noise and
    ending with noise, with `noise_counts` tokens and spans at random lengths.

    Returns:
        bool [length], True on noise tokens.
    """
    orig = length
    length = max(length, 2)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    span_start = np.zeros(length, np.int64)
    span_start[np.cumsum(interleaved)[:-1]] = 1
    return (np.cumsum(span_start) % 2 == 1)[:orig]


def span_corrupt(
    tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs keep the non-noise tokens with span k replaced by sentinel k; targets list
    sentinel k followed by the tokens of span k (T5's noise/nonnoise_span_to_unique_sentinel).

    Args:
        tokens: int [n]; noise_mask: bool [n]; sentinel_ids: int [>= spans],
            sentinel_ids[k] = id of <extra_id_k>.

    Returns:
        (inputs int32 [n - noise + spans], targets int32 [noise + spans]), no EOS.
    """
    prev = np.concatenate([[False], noise_mask[:-1]])
    span_start = noise_mask & ~prev
    span_index = np.cumsum(span_start) - 1
    num_spans = int(span_start.sum())
    if num_spans > len(sentinel_ids):
        raise ValueError(
            f"{num_spans} noise spans need {num_spans} sentinels but the tokenizer has "
            f"{len(sentinel_ids)}; use more sentinels or a shorter seq_len."
        )
    sentinel = sentinel_ids[np.clip(span_index, 0, None)]
    # Inputs: each noise span collapses to its sentinel.
    keep_in = ~noise_mask | span_start
    inputs = np.where(span_start, sentinel, tokens)[keep_in]
    # Targets: a sentinel in front of each span, then the span.
    n_out = int(noise_mask.sum()) + num_spans
    targets = np.empty(n_out, np.int32)
    noise_pos = np.nonzero(noise_mask)[0]
    # Output slot of each noise token = its rank among noise tokens + spans started so far.
    slots = np.arange(len(noise_pos)) + span_index[noise_pos] + 1
    targets[slots] = tokens[noise_pos]
    starts = np.nonzero(span_start)[0]
    targets[slots[np.searchsorted(noise_pos, starts)] - 1] = sentinel_ids[:num_spans]
    return inputs.astype(np.int32), targets


def reconstruct_span_corruption(
    inputs: np.ndarray, targets: np.ndarray, sentinel_ids: np.ndarray, eos_id: int | None = None
) -> np.ndarray:
    """Undo `span_corrupt`: put each span of `targets` back where its sentinel sits in
    `inputs`. A trailing `eos_id` (and padding after it) is ignored on both sides; a
    sentinel of `inputs` that `targets` does not fill (a model's partial answer) stays.

    Returns:
        int32 [n], the original tokens.
    """

    def strip(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if eos_id is not None and (x == eos_id).any():
            x = x[: int(np.argmax(x == eos_id))]
        return x

    inputs, targets = strip(inputs), strip(targets)
    sentinel_to_k = {int(s): k for k, s in enumerate(sentinel_ids)}
    spans: dict[int, list[int]] = {}
    current = None
    for t in targets.tolist():
        if t in sentinel_to_k:
            current = sentinel_to_k[t]
            spans[current] = []
        elif current is None:
            raise ValueError("targets must start with a sentinel.")
        else:
            spans[current].append(t)
    out: list[int] = []
    for t in inputs.tolist():
        if t in sentinel_to_k:
            out.extend(spans.get(sentinel_to_k[t], [t]))
        else:
            out.append(t)
    return np.asarray(out, np.int32)


# Source ----------------------------------------------------------------------------------------


class SpanCorruptionSource(Source):
    """T5 span corruption: raw chunks noised per draw, packed into encoder rows [T] and
    decoder rows [S]. Each chunk's corrupted lengths depend only on its length, so the
    packing is fixed while the noise changes every epoch (when dynamic)."""

    def __init__(self, stream, pieces, layout, T: int, S: int, config, tokenizer):
        tokenizer.require("eos", why="objective='span_corruption'")
        self.stream, self.pieces, self.layout, self.T, self.S = stream, pieces, layout, T, S
        self.num_examples = layout.num_rows
        self.seed = config.shuffle_seed
        self.dynamic = config.dynamic_masking
        self.density = config.noise_density
        self.mean_span = config.mean_noise_span_length
        self.sentinels = tokenizer.sentinel_ids
        self.eos = tokenizer.eos_id

    def row_spec(self) -> RowSpec:
        return enc_dec_spec(self.T, self.S)

    def corrupt(self, piece: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one chunk, EOS appended to both."""
        start, length = int(self.pieces.start[piece]), int(self.pieces.length[piece])
        tokens = np.asarray(self.stream[start : start + length])
        rng = example_rng(self.seed, STREAM_NOISE, epoch if self.dynamic else 0, piece)
        noise = random_spans_noise_mask(length, self.density, self.mean_span, rng)
        inputs, targets = span_corrupt(tokens, noise, self.sentinels)
        return np.append(inputs, self.eos), np.append(targets, self.eos)

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        b = len(indices)
        enc = np.zeros((3, b, self.T), np.int32)  # tokens, segment ids, positions
        dec = np.zeros((3, b, self.S), np.int32)
        pid, brow, seg = packing.row_pieces(self.layout, indices)
        for p, r, s in zip(pid.tolist(), brow.tolist(), seg.tolist(), strict=True):
            inputs, targets = self.corrupt(p, epoch)
            for side, seq, off in (
                (enc, inputs, self.layout.offsets[0]),
                (dec, targets, self.layout.offsets[1]),
            ):
                o = int(off[p])
                side[0, r, o : o + len(seq)] = seq
                side[1, r, o : o + len(seq)] = s
                side[2, r, o : o + len(seq)] = np.arange(len(seq))
        return {
            "encoder_tokens": enc[0],
            "encoder_segment_ids": enc[1],
            "encoder_positions": enc[2],
            **decoder_side(dec[0], dec[1], dec[2]),
        }


def span_source(split: Split) -> SpanCorruptionSource:
    """Chunks of the split's documents span-corrupted into encoder rows of T and decoder
    rows of `target_seq_len` (T5's noise density and mean span length)."""
    config, tokenizer, T = split.config, split.tokenizer, split.config.seq_len
    density, mean = config.noise_density, config.mean_noise_span_length
    docs = split.corpus.fields["docs"]
    raw, derived_S = span_corruption_raw_length(T, config.target_seq_len, density, mean)
    S = config.target_seq_len or derived_S
    _, spans = noise_counts(raw, density, mean)
    if spans > tokenizer.num_sentinels:
        raise ValueError(
            f"span corruption of {raw}-token chunks (seq_len={T}) makes {spans} noise spans "
            f"but the tokenizer has {tokenizer.num_sentinels} sentinels; lower seq_len, "
            "raise mean_noise_span_length, or use a tokenizer with more sentinels."
        )
    pieces = packing.wrapped_chunks(docs.offsets, raw, min_tokens=2)
    pieces = split.keep_pieces(pieces, "document chunks")
    lengths = np.asarray(
        [span_corruption_lengths(n, density, mean) for n in pieces.length.tolist()],
        np.int64,
    ).reshape(-1, 2)
    layout = packing.pack([lengths[:, 0], lengths[:, 1]], [T, S], config.pack)
    return SpanCorruptionSource(docs.tokens, pieces, layout, T, S, config, tokenizer)


def check_config(config: DataConfig) -> None:
    """Span corruption replaces each noise span by a sentinel, so it needs some."""
    if config.num_sentinels < 1:
        raise ValueError(
            "DataConfig.num_sentinels=0 but objective='span_corruption' needs sentinel "
            "tokens; set num_sentinels=100 (T5)."
        )


SPEC = ObjectiveSpec(
    name="span_corruption",
    formats=("text",),
    read=read_docs,
    source=span_source,
    loss_weights={"lm": "decoder_weights"},
    main_loss="lm",
    token_fields=("encoder_tokens", "decoder_tokens"),
    sentinels=100,  # T5's <extra_id_0..99>
    check=check_config,
)
