"""What every objective module provides: an `ObjectiveSpec`, a `Source`, seeded randomness.

An objective is declared once, in its own module: how its corpus is read (`read`), how a
split's examples become numpy batches (`source`), and what the training side needs to know
about those batches (`loss_weights`, `main_loss`, `token_fields`). The registry in
`llm_jax.data.objectives` maps each name to its spec; the pipeline, the train step, eval
and FLOP counting read the spec instead of guessing from batch keys.

Randomness: every random choice about one example (which tokens to mask, which segment
pairs with which, where the noise spans fall) comes from `example_rng(seed, stream,
epoch, index)`, a NumPy generator that is a pure function of those four integers. The
same example therefore gets the same treatment whichever host, batch or worker builds it,
and a resumed run rebuilds exactly the batches it would have seen. Static masking
(BERT) passes epoch 0 every epoch; dynamic masking (RoBERTa, and T5's noise) passes the
epoch.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_jax.data import corpus as corpus_lib
from llm_jax.data import packing
from llm_jax.data.splits import split_indices

if TYPE_CHECKING:
    from llm_jax.data.config import DataConfig
    from llm_jax.data.tokenizer import Tokenizer

# Distinct generator streams, so e.g. the NSP coin flip and the MLM mask of one example
# are independent draws.
STREAM_MLM = 1
STREAM_PAIR = 2
STREAM_NOISE = 3

RowSpec = dict[str, tuple[tuple[int, ...], type]]


def example_rng(seed: int, stream: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one example's random choices; a pure function of its arguments."""
    return np.random.default_rng([seed, stream, epoch, index])


# Sources ---------------------------------------------------------------------------------------


class Source(abc.ABC):
    """Random access to a split's examples: `build(indices, epoch)` is the pure, seeded
    function that turns example ids (-1 = an all-padding row) into a numpy batch."""

    num_examples: int

    @abc.abstractmethod
    def row_spec(self) -> RowSpec:
        """Per-example shape and dtype of each batch entry (the batch adds a leading B)."""

    @abc.abstractmethod
    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        """Batch for example ids `indices` [b] seen in epoch `epoch`."""

    def empty(self, b: int) -> dict[str, np.ndarray]:
        return {k: np.zeros((b, *s), d) for k, (s, d) in self.row_spec().items()}


class PackedSource(Source):
    """A source whose examples are packed rows of pieces of one token stream."""

    def __init__(self, stream: np.ndarray, pieces: packing.Pieces, layout: packing.Packing, T: int):
        self.stream, self.pieces, self.layout, self.T = stream, pieces, layout, T
        self.num_examples = layout.num_rows

    def gather(self, indices: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """tokens, segment_ids, positions: int32 [b, width] of packed rows `indices` [b]."""
        pid, brow, seg = packing.row_pieces(self.layout, indices)
        return packing.gather(
            self.stream,
            self.pieces,
            self.layout.offsets[0],
            pid,
            brow,
            seg,
            (len(indices), width),
        )


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of the corpus, as an objective's `source` builder receives it.

    Attributes:
        config: the run's data config.
        tokenizer: the run's tokenizer.
        corpus: the tokenized corpus this split is drawn from (fields as the reader wrote).
        name: "train", "validation" or "test".
        what: the config field the corpus came from, for messages.
        fraction: share of `corpus` held out for validation; 0 means all of it is this split.
        train_corpus: the training corpus, for choices both splits must share (label ids).
    """

    config: DataConfig
    tokenizer: Tokenizer
    corpus: corpus_lib.TokenizedCorpus
    name: str
    what: str
    fraction: float
    train_corpus: Callable[[], corpus_lib.TokenizedCorpus]

    def keep(self, n: int, unit: str) -> np.ndarray | None:
        """Sorted indices of this split's share of `n` units (None: all of them)."""
        if self.fraction == 0:
            return None
        config = self.config
        return split_indices(
            n, self.fraction, config.split_seed, self.name, unit, config.validation_split
        )

    def keep_pieces(self, pieces: packing.Pieces, unit: str) -> packing.Pieces:
        index = self.keep(len(pieces), unit)
        return pieces if index is None else pieces.select(index)


# Readers ---------------------------------------------------------------------------------------

# (config, tokenizer, files, what) -> (the token cache's key params, build the corpus).
CorpusReader = Callable[
    ["DataConfig", "Tokenizer", Sequence[str], str],
    tuple[dict[str, Any], Callable[[], corpus_lib.TokenizedCorpus]],
]


def read_docs(
    config: DataConfig, tokenizer: Tokenizer, files: Sequence[str], what: str
) -> tuple[dict[str, Any], Callable[[], corpus_lib.TokenizedCorpus]]:
    """Running text, one document per `config.doc_split` unit: field "docs"."""
    params = {"kind": "docs", "doc_split": config.doc_split}

    def build() -> corpus_lib.TokenizedCorpus:
        docs, counts = corpus_lib.read_documents(files, config.doc_split, config.file_pattern, what)
        return corpus_lib.TokenizedCorpus(
            {"docs": corpus_lib.encode_ragged(tokenizer, docs)}, {}, {"invalid_utf8": counts}
        )

    return params, build


# The spec --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveSpec:
    """Everything the pipeline and the trainer know about one objective.

    Attributes:
        name: the `DataConfig.objective` value.
        formats: the `DataConfig.format`s it can read.
        read: how the corpus is read and tokenized (see `CorpusReader`).
        source: builds a split's `Source` from the tokenized corpus.
        loss_weights: loss name -> the [B] or [B, T] batch array weighting it; the loss is
            sum / sum(weights). A loss whose array a batch does not hold is not computed
            (mlm's "nsp" without `pair_task`).
        main_loss: the loss eval reports perplexity for.
        token_fields: the batch arrays whose elements count as tokens processed.
        lm_head: whether the model's vocabulary projection runs (FLOP counting).
        tokenizer_texts: the texts a tokenizer learns from when the corpus is a table
            (TSV / fastText); None for running text, which trains on the files.
        sentinels: how many T5 sentinels a tokenizer trained for it reserves by default
            (`DataConfig.num_sentinels=None`); 0 for objectives that never use them.
        check: the objective's own cross-checks of a `DataConfig`, run by its `validate`
            after the generic ones; raises ValueError naming the field. None: no extra ones.
    """

    name: str
    formats: tuple[str, ...]
    read: CorpusReader
    source: Callable[[Split], Source]
    loss_weights: Mapping[str, str]
    main_loss: str
    token_fields: tuple[str, ...]
    lm_head: bool = True
    tokenizer_texts: Callable[[DataConfig], list[str]] | None = None
    sentinels: int = 0
    check: Callable[[DataConfig], None] | None = None

    def __post_init__(self) -> None:
        if self.main_loss not in self.loss_weights:
            raise ValueError(
                f"objective {self.name!r}: main_loss={self.main_loss!r} is not one of its "
                f"loss_weights {sorted(self.loss_weights)}."
            )
        if not self.formats or not self.token_fields:
            raise ValueError(f"objective {self.name!r} needs formats and token_fields.")
        if self.tokenizer_texts is None and self.formats != ("text",):
            raise ValueError(
                f"objective {self.name!r} reads {list(self.formats)}: give tokenizer_texts."
            )
