"""The pretraining objectives' batch builders as pure, seeded NumPy functions.

Randomness: every random choice about one example (which tokens to mask, which segment
pairs with which, where the noise spans fall) comes from `example_rng(seed, stream,
epoch, index)`, a NumPy generator that is a pure function of those four integers. The
same example therefore gets the same treatment whichever host, batch or worker builds it,
and a resumed run rebuilds exactly the batches it would have seen. Static masking
(BERT) passes epoch 0 every epoch; dynamic masking (RoBERTa, and T5's noise) passes the
epoch.

Batch dict contracts (int32 unless noted; names shared with the models and the trainer):
    CLM:   tokens, targets, weights (f32), segment_ids, positions               [B, T]
    MLM:   tokens (masked), targets (original), weights (f32, 1 on selected),
           segment_ids, positions, token_type_ids [B, T]; nsp_labels [B] with NSP/SOP
    T5 / seq2seq: encoder_tokens, encoder_segment_ids, encoder_positions [B, T];
           decoder_tokens, decoder_targets, decoder_weights (f32), decoder_segment_ids,
           decoder_positions [B, S]
    Classification: tokens, token_type_ids, segment_ids, positions [B, T]; labels [B]
"""

from __future__ import annotations

import numpy as np

# Distinct generator streams, so e.g. the NSP coin flip and the MLM mask of one example
# are independent draws.
STREAM_MLM = 1
STREAM_PAIR = 2
STREAM_NOISE = 3


def example_rng(seed: int, stream: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one example's random choices; a pure function of its arguments."""
    return np.random.default_rng([seed, stream, epoch, index])


# CLM -----------------------------------------------------------------------------------------


def clm_batch(
    rows: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray
) -> dict[str, np.ndarray]:
    """Causal-LM batch from packed rows one token longer than the model's T.

    Input t predicts token t+1; a pair counts (weight 1) only when both tokens belong to
    the same document, so no target crosses a document boundary and padding has weight 0.

    Args:
        rows, segment_ids, positions: int32 [B, T+1], packed rows (see `packing`).

    Returns:
        tokens, targets, segment_ids, positions: int32 [B, T]; weights: float32 [B, T].
    """
    same = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] != 0)
    return {
        "tokens": np.ascontiguousarray(rows[:, :-1]),
        "targets": np.ascontiguousarray(rows[:, 1:]),
        "weights": same.astype(np.float32),
        "segment_ids": np.ascontiguousarray(segment_ids[:, :-1]),
        "positions": np.ascontiguousarray(positions[:, :-1]),
    }


# MLM -----------------------------------------------------------------------------------------


def mlm_mask(
    tokens: np.ndarray,
    candidates: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    random_ids: np.ndarray,
    mlm_probability: float = 0.15,
    mask_token_fraction: float = 0.8,
    random_token_fraction: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: select each candidate with probability `mlm_probability`; of the
    selected, replace 80% by <mask>, 10% by a random ordinary token, keep 10%.

    Selection is an independent coin per token (as in RoBERTa / Hugging Face's collator),
    so the selected fraction is 15% in expectation. Non-candidates (special tokens,
    padding) are never selected.

    Args:
        tokens: int [...] ids.
        candidates: bool [...], True where a token may be selected.
        rng: the example's generator.
        random_ids: int32 [M], ids a "random token" is drawn from (no special ids).

    Returns:
        (masked tokens int32 [...], weights float32 [...]: 1 on selected positions).
    """
    selected = candidates & (rng.random(tokens.shape) < mlm_probability)
    action = rng.random(tokens.shape)
    replace_mask = selected & (action < mask_token_fraction)
    replace_random = (
        selected
        & (action >= mask_token_fraction)
        & (action < mask_token_fraction + random_token_fraction)
    )
    out = np.where(replace_mask, mask_id, tokens).astype(np.int32)
    rand = random_ids[rng.integers(0, len(random_ids), size=tokens.shape)]
    out = np.where(replace_random, rand, out).astype(np.int32)
    return out, selected.astype(np.float32)


def ordinary_ids(vocab_size: int, special_ids: np.ndarray) -> np.ndarray:
    """int32 [M]: every id that is not a special token or sentinel (MLM's random pool)."""
    keep = np.ones(vocab_size, bool)
    keep[special_ids] = False
    return np.nonzero(keep)[0].astype(np.int32)


def truncate_pair(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Longest-first truncation of a segment pair to at most `budget` tokens (BERT)."""
    if len_a + len_b <= budget:
        return len_a, len_b
    a = min(len_a, max(budget - len_b, (budget + 1) // 2))
    return a, min(len_b, budget - a)


def pair_row(
    a: np.ndarray, b: np.ndarray | None, length: int, cls_id: int, sep_id: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """`[CLS] a [SEP] (b [SEP])` truncated longest-first to `length` and zero-padded.

    Returns:
        (tokens int32 [length], token_type_ids int32 [length]: 0 for CLS a SEP, 1 for b SEP,
        number of real tokens).
    """
    specials = 3 if b is not None else 2
    la, lb = truncate_pair(len(a), 0 if b is None else len(b), length - specials)
    parts = [[cls_id], a[:la], [sep_id]]
    if b is not None:
        parts += [b[:lb], [sep_id]]
    seq = np.concatenate([np.asarray(x, np.int32) for x in parts])
    tokens = np.zeros(length, np.int32)
    types = np.zeros(length, np.int32)
    tokens[: len(seq)] = seq
    if b is not None:
        types[la + 2 : len(seq)] = 1
    return tokens, types, len(seq)


# T5 span corruption --------------------------------------------------------------------------


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
    `inputs`. A trailing `eos_id` (and padding after it) is ignored on both sides.

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
            out.extend(spans[sentinel_to_k[t]])
        else:
            out.append(t)
    return np.asarray(out, np.int32)


# Encoder-decoder ------------------------------------------------------------------------------


def shift_right(
    targets: np.ndarray, segment_ids: np.ndarray | None = None, start_id: int = 0
) -> np.ndarray:
    """Decoder inputs: targets moved one step right, `start_id` (T5: pad = 0) at the start of
    every packed segment, padding kept at 0.

    Args:
        targets: int [B, S]; segment_ids: int [B, S] or None (one sequence per row).

    Returns:
        int32 [B, S].
    """
    out = np.zeros_like(targets, dtype=np.int32)
    out[:, 1:] = targets[:, :-1]
    out[:, 0] = start_id
    if segment_ids is not None:
        first = np.ones_like(segment_ids, dtype=bool)
        first[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        out = np.where(first, start_id, out)
        out = np.where(segment_ids == 0, 0, out)
    return out.astype(np.int32)
