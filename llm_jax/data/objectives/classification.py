"""Sequence classification: one label per row, from TSV columns or fastText
`__label__X text` lines.

The row layout follows the tokenizer's special tokens:

- with both `<cls>` and `<sep>` (BERT, and every tokenizer `llm-jax tokenizer train`
  writes): `[CLS] text [SEP]` or `[CLS] a [SEP] b [SEP]`; BERT classifies from [CLS], a GPT
  from the final [SEP];
- otherwise (GPT-2, LLaMA tokenizers): `[bos] text [eos]` or `[bos] a [sep] b [eos]`, where
  the middle token is `<sep>` if the tokenizer has one and `<eos>` if not, and `[bos]` is
  there when `data.add_bos` is (the default). A GPT classifies from the last real token,
  the final [eos].

Rows are right-padded; a pair is truncated longest-first to fit.

Batch (int32 unless noted): tokens, token_type_ids, segment_ids, positions [B, T]; labels
and label_weights (f32, 1 on real rows, 0 on the rows that pad a last validation batch) [B].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_jax.data import corpus as corpus_lib
from llm_jax.data.objectives.base import ObjectiveSpec, RowSpec, Source, Split
from llm_jax.data.objectives.mlm import truncate_pair

if TYPE_CHECKING:
    from llm_jax.data.config import DataConfig
    from llm_jax.data.tokenizer import Tokenizer


def framed_row(
    a: np.ndarray, b: np.ndarray | None, length: int, first: int | None, mid: int, last: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """`[first] a [mid]` or `[first] a [mid] b [last]`, truncated longest-first to `length`
    and zero-padded on the right; `first` None leaves it out. BERT's row is
    `framed_row(a, b, T, cls, sep, sep)`.

    Returns:
        (tokens int32 [length], token_type_ids int32 [length]: 0 up to and including `mid`,
        1 for b and `last`, number of real tokens).
    """
    lead = int(first is not None)
    specials = lead + (2 if b is not None else 1)
    la, lb = truncate_pair(len(a), 0 if b is None else len(b), length - specials)
    parts = [[first]] if lead else []
    parts += [a[:la], [mid]]
    if b is not None:
        parts += [b[:lb], [last]]
    seq = np.concatenate([np.asarray(x, np.int32) for x in parts])
    tokens = np.zeros(length, np.int32)
    types = np.zeros(length, np.int32)
    tokens[: len(seq)] = seq
    if b is not None:
        types[lead + la + 1 : len(seq)] = 1
    return tokens, types, len(seq)


def row_specials(tokenizer: Tokenizer, add_bos: bool) -> tuple[int | None, int, int, int]:
    """(first, mid of a single text, mid of a pair, last) of the row layout (module doc)."""
    if tokenizer.cls_id is not None and tokenizer.sep_id is not None:
        return tokenizer.cls_id, tokenizer.sep_id, tokenizer.sep_id, tokenizer.sep_id
    why = (
        "objective='classification' with a tokenizer that has no <cls>/<sep> (rows "
        "[bos] a [sep-or-eos] b [eos])"
    )
    tokenizer.require("eos", why=why)
    if add_bos:
        tokenizer.require("bos", why=f"DataConfig.add_bos=True ({why}; or set add_bos=False)")
    eos = tokenizer.eos_id
    pair_mid = eos if tokenizer.sep_id is None else tokenizer.sep_id
    return (tokenizer.bos_id if add_bos else None), eos, pair_mid, eos


class ClassificationSource(Source):
    """Framed text (or text-pair) rows with an integer label each (see the module doc)."""

    def __init__(
        self, text_a, text_b, labels: np.ndarray, T: int, tokenizer: Tokenizer, add_bos=True
    ):
        self.text_a, self.text_b, self.labels, self.T = text_a, text_b, labels, T
        self.first, mid, pair_mid, self.last = row_specials(tokenizer, add_bos)
        self.mid = mid if text_b is None else pair_mid
        self.num_examples = len(labels)

    def row_spec(self) -> RowSpec:
        spec = {
            k: ((self.T,), np.int32)
            for k in ("tokens", "token_type_ids", "segment_ids", "positions")
        }
        return {**spec, "labels": ((), np.int32), "label_weights": ((), np.float32)}

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        out = self.empty(len(indices))
        for i, ex in enumerate(indices.tolist()):
            if ex < 0:
                continue
            b = None if self.text_b is None else self.text_b[ex]
            tokens, types, n = framed_row(
                self.text_a[ex], b, self.T, self.first, self.mid, self.last
            )
            out["tokens"][i], out["token_type_ids"][i] = tokens, types
            out["segment_ids"][i, :n] = 1
            out["positions"][i, :n] = np.arange(n)
            out["labels"][i] = self.labels[ex]
            out["label_weights"][i] = 1.0
        return out


def read(
    config: DataConfig, tokenizer: Tokenizer, files: Sequence[str], what: str
) -> tuple[dict[str, Any], Callable[[], corpus_lib.TokenizedCorpus]]:
    """Fields "text_a" [+ "text_b"], array "labels" (codes into meta "label_values", sorted)."""
    params = {
        "kind": config.format,
        "label_column": config.label_column,
        "text_columns": list(config.text_columns),
    }

    def build() -> corpus_lib.TokenizedCorpus:
        if config.format == "fasttext":
            labels, text_a, counts = corpus_lib.read_fasttext(files, config.file_pattern, what)
            texts = [text_a]
        else:
            cells, counts = corpus_lib.read_tsv_columns(
                files, [config.label_column, *config.text_columns], config.file_pattern, what
            )
            labels, texts = cells[0], cells[1:]
        values = sorted(set(labels))
        codes = np.searchsorted(values, labels).astype(np.int32)
        fields = {
            name: corpus_lib.encode_ragged(tokenizer, t)
            for name, t in zip(("text_a", "text_b"), texts, strict=False)
        }
        return corpus_lib.TokenizedCorpus(
            fields, {"labels": codes}, {"invalid_utf8": counts, "label_values": values}
        )

    return params, build


def tokenizer_texts(config: DataConfig) -> list[str]:
    """The text cells (never the labels): a tokenizer for a table learns from its texts."""
    if config.format == "fasttext":
        _, texts, _ = corpus_lib.read_fasttext(config.paths, config.file_pattern)
        return texts
    cells, _ = corpus_lib.read_tsv_columns(
        config.paths, list(config.text_columns), config.file_pattern
    )
    return [c for col in cells for c in col]


def label_codes(split: Split) -> np.ndarray:
    """int32 [n]: each example's index in `label_names` (default: the training corpus's
    sorted label values, so that ids mean the same in both splits)."""
    values = split.corpus.meta["label_values"]
    names = split.config.label_names
    given = names is not None
    if not given:
        names = split.train_corpus().meta["label_values"]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = (
            f"DataConfig.label_names={list(names)}; add them there"
            if given
            else f"the training labels {list(names)}; the model has no class for them: add "
            "training examples, remove them from the held-out file, or list every class in "
            "data.label_names"
        )
        raise ValueError(f"labels {unknown} in the data are not in {where}.")
    remap = np.asarray([list(names).index(v) for v in values], np.int32)
    return remap[split.corpus.arrays["labels"]]


def _subset(r: corpus_lib.Ragged, index: np.ndarray) -> corpus_lib.Ragged:
    lengths = r.lengths[index]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = (
        np.concatenate([r[i] for i in index.tolist()]).astype(np.int32)
        if len(index)
        else np.zeros(0, np.int32)
    )
    return corpus_lib.Ragged(tokens, offsets)


def classification_source(split: Split) -> ClassificationSource:
    """Labelled texts (or text pairs) as rows of T tokens with integer labels [B] and
    `label_weights` [B]; label ids from `data.label_names` or the sorted training labels;
    the row layout from the tokenizer's specials (module doc)."""
    labels = label_codes(split)
    a = split.corpus.fields["text_a"]
    b = split.corpus.fields.get("text_b")
    keep = split.keep(len(a), "labelled examples")
    if keep is not None:
        a, b, labels = _subset(a, keep), None if b is None else _subset(b, keep), labels[keep]
    return ClassificationSource(
        a, b, labels, split.config.seq_len, split.tokenizer, split.config.add_bos
    )


SPEC = ObjectiveSpec(
    name="classification",
    formats=("tsv", "fasttext"),
    read=read,
    source=classification_source,
    loss_weights={"cls": "label_weights"},
    main_loss="cls",
    token_fields=("tokens",),
    lm_head=False,
    tokenizer_texts=tokenizer_texts,
)
