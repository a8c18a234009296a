"""Causal LM (GPT): documents cut into chunks one token longer than a row, packed, each
token predicting the next.

Batch (int32 unless noted), [B, T]: tokens, targets, weights (f32), segment_ids, positions.
"""

from __future__ import annotations

import numpy as np

from llm_jax.data import packing
from llm_jax.data.objectives.base import ObjectiveSpec, PackedSource, RowSpec, Split, read_docs


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


class ClmSource(PackedSource):
    """Packed causal-LM rows (see `clm_batch`)."""

    def row_spec(self) -> RowSpec:
        shape = (self.T,)
        return {
            "tokens": (shape, np.int32),
            "targets": (shape, np.int32),
            "weights": (shape, np.float32),
            "segment_ids": (shape, np.int32),
            "positions": (shape, np.int32),
        }

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        return clm_batch(*self.gather(indices, self.T + 1))


def clm_source(split: Split) -> ClmSource:
    """The split's documents packed into rows of T + 1 tokens (next-token pairs), BOS/EOS
    framed as `data.add_bos` / `data.add_eos` say."""
    config, tokenizer, T = split.config, split.tokenizer, split.config.seq_len
    if config.add_bos:
        tokenizer.require("bos", why="DataConfig.add_bos=True")
    if config.add_eos:
        tokenizer.require("eos", why="DataConfig.add_eos=True")
    docs = split.corpus.fields["docs"]
    pieces = packing.overlapping_chunks(
        docs.offsets,
        T + 1,
        tokenizer.bos_id if config.add_bos else None,
        tokenizer.eos_id if config.add_eos else None,
    )
    pieces = split.keep_pieces(pieces, "document chunks")
    layout = packing.pack([pieces.size], [T + 1], config.pack)
    return ClmSource(docs.tokens, pieces, layout, T)


SPEC = ObjectiveSpec(
    name="clm",
    formats=("text",),
    read=read_docs,
    source=clm_source,
    loss_weights={"lm": "weights"},
    main_loss="lm",
    token_fields=("tokens",),
)
