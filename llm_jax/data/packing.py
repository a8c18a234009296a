"""Packing tokenized documents into fixed-length rows with segment ids and positions.

A document (or a row-sized chunk of a long one) becomes a *piece*: an optional prefix id,
a slice of the flat token stream, an optional suffix id. Pieces are packed in corpus order
into rows (next-fit: a piece that does not fit starts a new row), and a row is
materialised on demand by a vectorised gather, so only the layout — a few integers per
piece — lives in memory while the token stream stays memory-mapped.

Conventions (shared with the models and the trainer): segment id 0 is padding; the
pieces of a row get segment ids 1, 2, 3, ...; positions restart at 0 in every piece.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Pieces:
    """P pieces; piece p is `[prefix[p]] + stream[start[p] : start[p] + length[p]] + [suffix[p]]`
    where a prefix / suffix of -1 means none.

    Attributes:
        start: int64 [P], offset of the piece's first stream token.
        length: int64 [P], number of stream tokens.
        prefix: int32 [P], id placed before them, or -1.
        suffix: int32 [P], id placed after them, or -1.
    """

    start: np.ndarray
    length: np.ndarray
    prefix: np.ndarray
    suffix: np.ndarray

    def __len__(self) -> int:
        return len(self.start)

    @property
    def size(self) -> np.ndarray:
        """int64 [P], tokens per piece including prefix and suffix."""
        return self.length + (self.prefix >= 0) + (self.suffix >= 0)

    def select(self, index: np.ndarray) -> Pieces:
        """The pieces at `index` (int indices or a boolean mask), in that order."""
        return Pieces(self.start[index], self.length[index], self.prefix[index], self.suffix[index])


def _ids(value: int | None, n: int) -> np.ndarray:
    return np.full(n, -1 if value is None else value, np.int32)


def _within(counts: np.ndarray) -> np.ndarray:
    """[sum(counts)]: 0..c-1 for each c in counts, back to back."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts


def overlapping_chunks(
    offsets: np.ndarray, chunk_len: int, bos_id: int | None = None, eos_id: int | None = None
) -> Pieces:
    """CLM pieces: each document `[bos] + doc + [eos]` cut into chunks of `chunk_len` tokens
    that overlap by one, so every next-token pair of the document lies inside one chunk.

    With chunk_len = T + 1 a chunk is one row's inputs plus its last target. Documents
    shorter than two tokens (nothing to predict) are dropped.

    Args:
        offsets: int64 [n + 1], document boundaries in the token stream.
        chunk_len: tokens per chunk (>= 2).
    """
    if chunk_len < 2:
        raise ValueError(f"chunk_len={chunk_len} must be >= 2.")
    n_raw = np.diff(offsets)
    a = int(bos_id is not None)
    e = int(eos_id is not None)
    m = n_raw + a + e  # virtual length with bos/eos
    stride = chunk_len - 1
    counts = np.where(m >= 2, -(-(m - 1) // stride), 0)
    doc = np.repeat(np.arange(len(n_raw)), counts)
    k = _within(counts)
    v_lo = k * stride  # virtual [v_lo, v_hi)
    v_hi = np.minimum(v_lo + chunk_len, m[doc])
    raw_lo = np.maximum(v_lo - a, 0)
    raw_hi = np.minimum(v_hi - a, n_raw[doc])
    has_bos = (v_lo == 0) & bool(a)
    has_eos = (v_hi == m[doc]) & bool(e)
    return Pieces(
        start=offsets[doc] + raw_lo,
        length=np.maximum(raw_hi - raw_lo, 0),
        prefix=np.where(has_bos, _ids(bos_id, len(doc)), -1).astype(np.int32),
        suffix=np.where(has_eos, _ids(eos_id, len(doc)), -1).astype(np.int32),
    )


def wrapped_chunks(
    offsets: np.ndarray,
    max_tokens: int,
    prefix_id: int | None = None,
    suffix_id: int | None = None,
    min_tokens: int = 1,
) -> Pieces:
    """Each document cut into consecutive chunks of at most `max_tokens` stream tokens, every
    chunk wrapped as `[prefix] + chunk + [suffix]` (e.g. BERT's [CLS] ... [SEP]).

    Chunks with fewer than `min_tokens` stream tokens are dropped.

    Args:
        offsets: int64 [n + 1], document boundaries in the token stream.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1.")
    n_raw = np.diff(offsets)
    counts = -(-n_raw // max_tokens)
    doc = np.repeat(np.arange(len(n_raw)), counts)
    k = _within(counts)
    start = k * max_tokens
    length = np.minimum(max_tokens, n_raw[doc] - start)
    keep = length >= min_tokens
    return Pieces(
        start=(offsets[doc] + start)[keep],
        length=length[keep],
        prefix=_ids(prefix_id, int(keep.sum())),
        suffix=_ids(suffix_id, int(keep.sum())),
    )


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where each piece sits: pieces row_ptr[r] .. row_ptr[r+1]-1 fill row r, piece p starting
    at column offsets[side][p] of its row (one offsets array per packed side, e.g. encoder and
    decoder of a seq2seq pair).

    Attributes:
        row_ptr: int64 [R + 1].
        offsets: one int64 [P] array per side.
    """

    row_ptr: np.ndarray
    offsets: tuple[np.ndarray, ...]

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


def pack(sizes: Sequence[np.ndarray], capacities: Sequence[int], enabled: bool = True) -> Packing:
    """Next-fit packing of pieces, in order, into rows.

    Every side's sizes must fit its capacity together (a seq2seq pair is placed only where
    both its source fits the encoder row and its target the decoder row). Next-fit keeps
    corpus order, which keeps the layout a pure function of the corpus and makes rows
    contiguous runs of pieces.

    Args:
        sizes: per side, int [P] tokens per piece.
        capacities: per side, the row length.
        enabled: False puts every piece in a row of its own.
    """
    num = len(sizes[0])
    for side, (sz, cap) in enumerate(zip(sizes, capacities, strict=True)):
        if num and int(sz.max()) > cap:
            raise ValueError(
                f"a piece of {int(sz.max())} tokens exceeds row length {cap} (side {side})."
            )
    if not enabled:
        return Packing(
            np.arange(num + 1, dtype=np.int64), tuple(np.zeros(num, np.int64) for _ in sizes)
        )
    lists = [sz.tolist() for sz in sizes]
    offsets = [np.empty(num, np.int64) for _ in sizes]
    row_ptr = [0]
    used = [0] * len(sizes)
    for p in range(num):
        if p != row_ptr[-1] and any(
            u + sz[p] > cap for u, sz, cap in zip(used, lists, capacities, strict=True)
        ):
            row_ptr.append(p)
            used = [0] * len(sizes)
        for side, sz in enumerate(lists):
            offsets[side][p] = used[side]
            used[side] += sz[p]
    row_ptr.append(num)
    return Packing(np.asarray(row_ptr, np.int64), tuple(offsets))


def row_pieces(packing: Packing, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pieces of the given rows, flattened.

    Args:
        rows: int [b], row ids; -1 means an empty (all padding) row.

    Returns:
        (piece ids [Q], batch row of each [Q], segment id of each within its row [Q], 1-based).
    """
    rows = np.asarray(rows, np.int64)
    out_b = np.nonzero(rows >= 0)[0]
    r = rows[out_b]
    lo = packing.row_ptr[r]
    counts = packing.row_ptr[r + 1] - lo
    within = _within(counts)
    pid = np.repeat(lo, counts) + within
    return pid, np.repeat(out_b, counts), within + 1


def gather(
    stream: np.ndarray,
    pieces: Pieces,
    offsets: np.ndarray,
    pid: np.ndarray,
    brow: np.ndarray,
    seg: np.ndarray,
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialise pieces into rows.

    Args:
        stream: int32 [N], the flat token stream the pieces point into.
        offsets: int64 [P], column of each piece in its row.
        pid, brow, seg: from `row_pieces`.
        shape: (b, width) of the output.

    Returns:
        tokens, segment_ids, positions: int32 [b, width] each (0 on padding).
    """
    tokens = np.zeros(shape, np.int32)
    segment_ids = np.zeros(shape, np.int32)
    positions = np.zeros(shape, np.int32)
    if len(pid) == 0:
        return tokens, segment_ids, positions
    size = pieces.size[pid]
    q = np.repeat(np.arange(len(pid)), size)  # which gathered piece each output token is
    j = _within(size)  # position inside the piece
    prefix = pieces.prefix[pid]
    suffix = pieces.suffix[pid]
    has_prefix = (prefix >= 0).astype(np.int64)
    src = pieces.start[pid][q] + j - has_prefix[q]
    values = stream[np.clip(src, 0, max(len(stream) - 1, 0))] if len(stream) else np.zeros_like(src)
    values = np.where((j == 0) & (has_prefix[q] == 1), prefix[q], values)
    values = np.where((j == size[q] - 1) & (suffix[q] >= 0), suffix[q], values)
    flat = brow[q] * shape[1] + offsets[pid][q] + j
    tokens.flat[flat] = values
    segment_ids.flat[flat] = seg[q]
    positions.flat[flat] = j
    return tokens, segment_ids, positions
