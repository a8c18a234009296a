"""Sequence to sequence (T5 fine-tuning, translation): source -> target pairs from two TSV
columns, each EOS-terminated and truncated to fit, optionally packed.

Text-to-text classification (T5): from fastText lines `__label__X text` the source is the
text and the target the label's word — `data.label_words[i]` for `data.label_names[i]`, or
the label name itself ("pos") when no words are given.

Batch (int32 unless noted): encoder_tokens, encoder_segment_ids, encoder_positions [B, T];
decoder_tokens, decoder_targets, decoder_weights (f32), decoder_segment_ids,
decoder_positions [B, S]. Span corruption builds the same batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_jax.data import corpus as corpus_lib
from llm_jax.data import packing
from llm_jax.data.objectives.base import ObjectiveSpec, RowSpec, Source, Split

if TYPE_CHECKING:
    from llm_jax.data.config import DataConfig
    from llm_jax.data.tokenizer import Tokenizer


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


def enc_dec_spec(T: int, S: int) -> RowSpec:
    """Row spec of an encoder-decoder batch: encoder rows [T], decoder rows [S]."""
    return {
        "encoder_tokens": ((T,), np.int32),
        "encoder_segment_ids": ((T,), np.int32),
        "encoder_positions": ((T,), np.int32),
        "decoder_tokens": ((S,), np.int32),
        "decoder_targets": ((S,), np.int32),
        "decoder_weights": ((S,), np.float32),
        "decoder_segment_ids": ((S,), np.int32),
        "decoder_positions": ((S,), np.int32),
    }


def decoder_side(targets: np.ndarray, segs: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """The decoder half of the batch from packed targets, segment ids, positions [B, S]."""
    return {
        "decoder_tokens": shift_right(targets, segs, start_id=0),
        "decoder_targets": targets,
        "decoder_weights": (segs != 0).astype(np.float32),
        "decoder_segment_ids": segs,
        "decoder_positions": pos,
    }


class Seq2SeqSource(Source):
    """Source → target pairs (EOS-terminated, truncated to fit), optionally packed."""

    def __init__(self, src, tgt, src_pieces, tgt_pieces, layout, T: int, S: int):
        self.src, self.tgt = src, tgt
        self.src_pieces, self.tgt_pieces, self.layout = src_pieces, tgt_pieces, layout
        self.T, self.S = T, S
        self.num_examples = layout.num_rows

    def row_spec(self) -> RowSpec:
        return enc_dec_spec(self.T, self.S)

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        pid, brow, seg = packing.row_pieces(self.layout, indices)
        b = len(indices)
        e_tok, e_seg, e_pos = packing.gather(
            self.src, self.src_pieces, self.layout.offsets[0], pid, brow, seg, (b, self.T)
        )
        d_tok, d_seg, d_pos = packing.gather(
            self.tgt, self.tgt_pieces, self.layout.offsets[1], pid, brow, seg, (b, self.S)
        )
        return {
            "encoder_tokens": e_tok,
            "encoder_segment_ids": e_seg,
            "encoder_positions": e_pos,
            **decoder_side(d_tok, d_seg, d_pos),
        }


def _columns(config: DataConfig) -> list[int]:
    return [config.source_column, config.target_column]


def label_targets(labels: Sequence[str], config: DataConfig, where: str) -> list[str]:
    """The target text of each fastText label: its `label_words` entry, else the label.

    Raises:
        ValueError: a label missing from `config.label_names` (when those are given).
    """
    names = config.label_names
    if names is None:
        return list(labels)
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ValueError(
            f"{where}: labels {unknown} are not in DataConfig.label_names={list(names)}; add "
            "them there (and their label_words)."
        )
    words = dict(zip(names, config.label_words or names, strict=True))
    return [words[label] for label in labels]


def read_pairs(
    config: DataConfig, files: Sequence[str], what: str
) -> tuple[list[str], list[str], dict[str, int]]:
    """(sources, targets, invalid-UTF-8 counts): TSV columns, or fastText text -> label word."""
    if config.format == "fasttext":
        labels, texts, counts = corpus_lib.read_fasttext(files, config.file_pattern, what)
        return texts, label_targets(labels, config, what), counts
    (src, tgt), counts = corpus_lib.read_tsv_columns(
        files, _columns(config), config.file_pattern, what
    )
    return src, tgt, counts


def read(
    config: DataConfig, tokenizer: Tokenizer, files: Sequence[str], what: str
) -> tuple[dict[str, Any], Callable[[], corpus_lib.TokenizedCorpus]]:
    """Fields "source" and "target": TSV source and target columns, or fastText texts and
    their label words."""
    if config.format == "fasttext":
        params = {
            "kind": "fasttext",
            "label_names": config.label_names,
            "label_words": config.label_words,
        }
    else:
        params = {"kind": "tsv", "columns": _columns(config)}

    def build() -> corpus_lib.TokenizedCorpus:
        src, tgt, counts = read_pairs(config, files, what)
        fields = {
            "source": corpus_lib.encode_ragged(tokenizer, src),
            "target": corpus_lib.encode_ragged(tokenizer, tgt),
        }
        return corpus_lib.TokenizedCorpus(fields, {}, {"invalid_utf8": counts})

    return params, build


def tokenizer_texts(config: DataConfig) -> list[str]:
    """Source and target texts (label words included): a tokenizer for a table learns from
    its texts only."""
    src, tgt, _ = read_pairs(config, config.paths, "DataConfig.paths")
    return src + tgt


def _truncated(
    r: corpus_lib.Ragged, index: np.ndarray, max_tokens: int, eos: int, side: str, field: str
) -> packing.Pieces:
    lengths = r.lengths[index]
    cut = int((lengths > max_tokens).sum())
    if cut:
        warnings.warn(
            f"{cut} of {len(index)} {side} texts are longer than {max_tokens} tokens and were "
            f"truncated; raise DataConfig.{field} to keep them whole.",
            stacklevel=4,
        )
    n = len(index)
    return packing.Pieces(
        start=r.offsets[index],
        length=np.minimum(lengths, max_tokens),
        prefix=np.full(n, -1, np.int32),
        suffix=np.full(n, eos, np.int32),
    )


def seq2seq_source(split: Split) -> Seq2SeqSource:
    """(source, target) pairs as encoder rows of T and shifted-right decoder rows of
    `target_seq_len`, EOS-terminated."""
    config, tokenizer = split.config, split.tokenizer
    tokenizer.require("eos", why="objective='seq2seq'")
    T = config.seq_len
    S = config.target_seq_len or T
    src, tgt = split.corpus.fields["source"], split.corpus.fields["target"]
    keep = split.keep(len(src), "pairs")
    idx = np.arange(len(src)) if keep is None else keep
    src_pieces = _truncated(src, idx, T - 1, tokenizer.eos_id, "source", "seq_len")
    tgt_pieces = _truncated(tgt, idx, S - 1, tokenizer.eos_id, "target", "target_seq_len")
    layout = packing.pack([src_pieces.size, tgt_pieces.size], [T, S], config.pack)
    return Seq2SeqSource(src.tokens, tgt.tokens, src_pieces, tgt_pieces, layout, T, S)


SPEC = ObjectiveSpec(
    name="seq2seq",
    formats=("tsv", "fasttext"),
    read=read,
    source=seq2seq_source,
    loss_weights={"lm": "decoder_weights"},
    main_loss="lm",
    token_fields=("encoder_tokens", "decoder_tokens"),
    tokenizer_texts=tokenizer_texts,
)
