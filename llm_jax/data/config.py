"""`DataConfig`: where the text is, how it is tokenized, and how it becomes batches.

One frozen dataclass holds every data-side choice of a run. It validates itself on
construction (a bad value raises ValueError naming the field and what is allowed) and is
loaded from the `data:` section of a YAML run config with `DataConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from llm_jax.config import Config, at_least, in_interval, one_of
from llm_jax.data.objectives import OBJECTIVES as _REGISTRY

FORMATS = ("text", "tsv", "fasttext", "jsonl")
DOC_SPLITS = ("file", "line", "blank_line")
TOKENIZER_TYPES = ("unigram", "bpe", "char")
PAIR_TASKS = ("none", "nsp", "sop")
# Each objective declares which input formats it can read (see `llm_jax.data.objectives`).
OBJECTIVES = tuple(_REGISTRY)
OBJECTIVE_FORMATS = {name: spec.formats for name, spec in _REGISTRY.items()}
VALIDATION_SPLITS = ("random", "last")
_TUPLE_FIELDS = (
    "paths",
    "validation_paths",
    "test_paths",
    "text_columns",
    "label_names",
    "label_words",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(Config):
    """Data side of a run: corpus, tokenizer, shapes, order, objective.

    Shapes: B = `batch_size` (global, over all hosts), T = `seq_len` (encoder / decoder-only
    length), and for seq2seq and span corruption the decoder length `target_seq_len`.
    """

    section: ClassVar[str] = "data"

    # Corpus ----------------------------------------------------------------------------------
    paths: tuple[str, ...] = ()  # files or folders (folders are walked recursively).
    # "text" | "tsv" | "fasttext" (`__label__X text` lines) | "jsonl" (instruct:
    # {"prompt": ..., "response": ...} per line).
    format: str = "text"
    doc_split: str = "file"  # text: one document per "file", per "line" or per "blank_line".
    file_pattern: str = "*"  # fnmatch pattern for file names inside folders.
    source_column: int = 0  # tsv, seq2seq: 0-based column of the source text.
    target_column: int = 1  # tsv, seq2seq: 0-based column of the target text.
    text_columns: tuple[int, ...] = (0,)  # tsv, classification: one column, or two (a pair).
    label_column: int = 1  # tsv, classification.
    label_names: tuple[str, ...] | None = None  # label order (id = index); None: sorted.
    # seq2seq from fastText (text-to-text classification): the target word of each label
    # in `label_names`, same order; None: the label itself is the target.
    label_words: tuple[str, ...] | None = None

    # Tokenizer -------------------------------------------------------------------------------
    tokenizer_path: str | None = None  # saved tokenizer dir; trained here if it is missing.
    tokenizer_type: str = "unigram"  # "unigram" | "bpe" (SentencePiece) | "char".
    vocab_size: int | None = 8000  # total V, sentinels included; char: an upper bound.
    character_coverage: float | None = None  # None: 0.9995 (SentencePiece), 1.0 (char).
    byte_fallback: bool = True  # unseen characters become UTF-8 byte tokens, never <unk>.
    # T5's <extra_id_0..N-1>, the last ids of the vocabulary. None: what the objective
    # uses (100 for span_corruption, else 0).
    num_sentinels: int | None = None
    tokenizer_max_sentences: int = 1_000_000  # lines sampled to train the tokenizer.

    # Shapes ----------------------------------------------------------------------------------
    seq_len: int = 512  # T.
    target_seq_len: int | None = None  # decoder length; None: derived (span) or = seq_len.
    batch_size: int = 8  # B, global.
    pack: bool = True  # pack several documents / pairs per row (segment ids keep them apart).
    add_bos: bool = True  # clm: begin each document with <s>.
    add_eos: bool = True  # clm: end each document with </s>.

    # Order and splits ------------------------------------------------------------------------
    shuffle: bool = True
    shuffle_seed: int = 0  # also seeds masking, NSP pairing and span noise.
    validation_fraction: float = 0.0  # of examples, picked with `split_seed`.
    validation_paths: tuple[str, ...] = ()  # a separate validation corpus instead.
    # How validation_fraction picks its examples: "random" (a permutation seeded with
    # split_seed) or "last" (the corpus's last ones, a fixed contiguous range, e.g. the
    # last verses of a parallel text; train keeps the rest, in order).
    validation_split: str = "random"
    split_seed: int = 0  # kept apart from shuffle_seed so reshuffling never moves the split.
    test_paths: tuple[str, ...] = ()  # held-out test corpus, evaluated once at the run's end.

    # Objective -------------------------------------------------------------------------------
    objective: str = "clm"
    mlm_probability: float = 0.15  # fraction of ordinary tokens selected for prediction.
    mask_token_fraction: float = 0.8  # of selected: replaced by <mask>.
    random_token_fraction: float = 0.1  # of selected: replaced by a random token; rest kept.
    dynamic_masking: bool = True  # RoBERTa: new masks/pairs/noise each epoch; False: BERT.
    pair_task: str = "none"  # mlm: "nsp" (BERT), "sop" (ALBERT) or "none" (RoBERTa).
    noise_density: float = 0.15  # span corruption: fraction of tokens noised.
    mean_noise_span_length: float = 3.0  # span corruption: mean span length.

    # Loader ----------------------------------------------------------------------------------
    num_workers: int = 0  # grain threads building batches; 0 builds them in the caller.
    prefetch: int = 2  # batches grain buffers ahead when num_workers > 0.
    cache_dir: str | None = None  # token cache; None: $LLM_JAX_CACHE or ~/.cache/llm_jax.
    use_cache: bool = True

    def derived_defaults(self) -> dict[str, Any]:
        """`num_sentinels=None` stands for what the objective uses."""
        spec = _REGISTRY.get(self.objective)
        return {} if spec is None else {"num_sentinels": spec.sentinels}

    def __post_init__(self) -> None:
        self._fill_derived()
        self.validate()

    # Derived quantities ----------------------------------------------------------------------

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_paths) or self.validation_fraction > 0

    # Validation ------------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ValueError naming the bad field, its value and what would be valid."""
        self._check_types()
        self._check_fractions()
        self._check_tokenizer()
        self._check_objective()
        self._check_columns_and_splits()

    def _check_types(self) -> None:
        """Tuples, choices and integer bounds of single fields."""
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                raise ValueError(
                    f"DataConfig.{name}={value!r} must be a tuple (from_dict accepts lists)."
                )
        one_of(self, "format", FORMATS)
        one_of(self, "doc_split", DOC_SPLITS)
        one_of(self, "tokenizer_type", TOKENIZER_TYPES)
        one_of(self, "objective", OBJECTIVES)
        one_of(self, "pair_task", PAIR_TASKS)
        one_of(self, "validation_split", VALIDATION_SPLITS)
        at_least(self, "seq_len", 4)
        at_least(self, "target_seq_len", 2)
        at_least(self, "batch_size", 1)
        at_least(self, "vocab_size", 8)
        at_least(self, "num_sentinels", 0)
        at_least(self, "tokenizer_max_sentences", 1)
        at_least(self, "num_workers", 0)
        at_least(self, "prefetch", 1)
        for name in (
            "source_column",
            "target_column",
            "label_column",
            "shuffle_seed",
            "split_seed",
        ):
            at_least(self, name, 0)
        for col in self.text_columns:
            if isinstance(col, bool) or not isinstance(col, int) or col < 0:
                raise ValueError(
                    f"DataConfig.text_columns={self.text_columns} must hold 0-based column "
                    "indices (integers >= 0)."
                )

    def _check_fractions(self) -> None:
        """Probabilities and fractions, alone and summed; the noise span length."""
        if self.character_coverage is not None:
            in_interval(self, "character_coverage", 0, 1, low_open=True)
        in_interval(self, "validation_fraction", 0, 1, high_open=True)
        in_interval(self, "mlm_probability", 0, 1, low_open=True, high_open=True)
        in_interval(self, "mask_token_fraction", 0, 1)
        in_interval(self, "random_token_fraction", 0, 1)
        in_interval(self, "noise_density", 0, 1, low_open=True, high_open=True)
        if self.mask_token_fraction + self.random_token_fraction > 1:
            raise ValueError(
                f"DataConfig.mask_token_fraction + random_token_fraction = "
                f"{self.mask_token_fraction + self.random_token_fraction} must be <= 1 "
                "(the rest of the selected tokens are kept unchanged)."
            )
        if self.mean_noise_span_length < 1:
            raise ValueError(
                f"DataConfig.mean_noise_span_length={self.mean_noise_span_length} must be >= 1."
            )

    def _check_tokenizer(self) -> None:
        if self.num_sentinels > 100:
            raise ValueError(
                f"DataConfig.num_sentinels={self.num_sentinels} must be in [0, 100] "
                "(<extra_id_0> .. <extra_id_99>, as in T5)."
            )
        if self.vocab_size is None and self.tokenizer_type != "char":
            raise ValueError(
                "DataConfig.vocab_size=None is only allowed for tokenizer_type='char'; give "
                "SentencePiece a vocabulary size (e.g. 8000)."
            )

    def _check_objective(self) -> None:
        """What the objective can read, the mlm-only pair task, and the spec's own checks."""
        spec = _REGISTRY[self.objective]
        if self.format not in spec.formats:
            raise ValueError(
                f"DataConfig.format={self.format!r} cannot feed objective={self.objective!r}; "
                f"use format in {list(spec.formats)}."
            )
        if self.pair_task != "none" and self.objective != "mlm":
            raise ValueError(
                f"DataConfig.pair_task={self.pair_task!r} needs objective='mlm' (NSP/SOP are "
                "BERT/ALBERT pretraining tasks); set pair_task='none'."
            )
        if spec.check is not None:
            spec.check(self)

    def _check_columns_and_splits(self) -> None:
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(
                f"DataConfig.text_columns={self.text_columns} must name 1 column (text) or "
                "2 columns (text pair)."
            )
        if self.validation_paths and self.validation_fraction > 0:
            raise ValueError(
                "DataConfig: set either validation_fraction or validation_paths, not both."
            )
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"DataConfig.label_names={self.label_names} has duplicates.")
        self._check_label_words()

    def _check_label_words(self) -> None:
        if self.label_words is None:
            return
        if self.objective != "seq2seq" or self.format != "fasttext":
            raise ValueError(
                "DataConfig.label_words names the target word of each label for "
                "objective='seq2seq' with format='fasttext'; remove it (got objective="
                f"{self.objective!r}, format={self.format!r})."
            )
        if self.label_names is None or len(self.label_names) != len(self.label_words):
            raise ValueError(
                f"DataConfig.label_words={self.label_words} pairs one word with each of "
                f"label_names={self.label_names}; give label_names of the same length."
            )
