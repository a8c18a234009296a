"""Masked LM (BERT / RoBERTa), with BERT's next-sentence or ALBERT's sentence-order task.

Without a pair task, documents are cut into `[CLS] chunk [SEP]` segments and packed; with
one, each row is one `[CLS] A [SEP] B [SEP]` sentence pair. Either way 15% of the ordinary
tokens are selected for prediction by the 80/10/10 rule (`mlm_mask`).

Batch (int32 unless noted): tokens (masked), targets (original), weights (f32, 1 on
selected), segment_ids, positions, token_type_ids [B, T]; with NSP/SOP also nsp_labels and
nsp_weights (f32, 1 on real rows) [B].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_jax.data import corpus as corpus_lib
from llm_jax.data import packing
from llm_jax.data.objectives.base import (
    STREAM_MLM,
    STREAM_PAIR,
    ObjectiveSpec,
    PackedSource,
    RowSpec,
    Source,
    Split,
    example_rng,
    read_docs,
)

if TYPE_CHECKING:
    from llm_jax.data.config import DataConfig
    from llm_jax.data.tokenizer import Tokenizer


# Pure builders ---------------------------------------------------------------------------------


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


def nsp_examples(lengths: np.ndarray, groups: np.ndarray, budget: int) -> np.ndarray:
    """Sentence ranges of BERT-style pair examples, walking each document in order.

    Segment A takes sentences until it holds about half of `budget` tokens (at least one,
    leaving one for B); B takes the following sentences until the pair fills `budget` or
    the document ends. The next example starts after B.

    Args:
        lengths: int [n] tokens per sentence; groups: int [n] document of each sentence.

    Returns:
        int64 [E, 4]: (a_start, a_end, b_start, b_end) sentence indices, half-open.
    """
    out = []
    lengths = lengths.tolist()
    bounds = np.flatnonzero(np.diff(groups)) + 1
    for lo, hi in zip([0, *bounds.tolist()], [*bounds.tolist(), len(lengths)], strict=True):
        i = lo
        while i < hi - 1:
            j, la = i + 1, lengths[i]
            while j < hi - 1 and la < budget // 2:
                la += lengths[j]
                j += 1
            k, lb = j + 1, lengths[j]
            while k < hi and la + lb < budget:
                lb += lengths[k]
                k += 1
            out.append((i, j, j, k))
            i = k
    return np.asarray(out, np.int64).reshape(-1, 4)


# Sources ---------------------------------------------------------------------------------------


class Masking:
    """MLM settings shared by the packed-MLM and NSP/SOP sources."""

    def __init__(self, config: DataConfig, tokenizer: Tokenizer, seed: int):
        tokenizer.require("cls", "sep", "mask", why=f"objective={config.objective!r}")
        self.seed = seed
        self.dynamic = config.dynamic_masking
        self.mask_id = tokenizer.mask_id
        self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id
        special = tokenizer.all_special_ids
        self.is_special = np.zeros(tokenizer.vocab_size, bool)
        self.is_special[special] = True
        self.random_ids = ordinary_ids(tokenizer.vocab_size, special)
        self.kwargs = dict(
            mlm_probability=config.mlm_probability,
            mask_token_fraction=config.mask_token_fraction,
            random_token_fraction=config.random_token_fraction,
        )

    def epoch_key(self, epoch: int) -> int:
        # Static masking (BERT) draws each example's mask once: the same key every epoch.
        return epoch if self.dynamic else 0

    def apply(
        self, tokens: np.ndarray, segment_ids: np.ndarray, indices: np.ndarray, epoch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        masked = tokens.copy()
        weights = np.zeros(tokens.shape, np.float32)
        candidates = ~self.is_special[tokens] & (segment_ids != 0)
        for i, ex in enumerate(indices.tolist()):
            if ex < 0:
                continue
            rng = example_rng(self.seed, STREAM_MLM, self.epoch_key(epoch), ex)
            masked[i], weights[i] = mlm_mask(
                tokens[i],
                candidates[i],
                rng,
                mask_id=self.mask_id,
                random_ids=self.random_ids,
                **self.kwargs,
            )
        return masked, weights


def _token_spec(T: int) -> RowSpec:
    shape = (T,)
    spec = {k: (shape, np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    return {**spec, "weights": (shape, np.float32), "token_type_ids": (shape, np.int32)}


class MlmSource(PackedSource):
    """Packed masked-LM rows: each document chunk is `[CLS] chunk [SEP]`, its own segment."""

    def __init__(self, stream, pieces, layout, T: int, masking: Masking):
        super().__init__(stream, pieces, layout, T)
        self.masking = masking

    def row_spec(self) -> RowSpec:
        return _token_spec(self.T)

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        tokens, segs, pos = self.gather(indices, self.T)
        masked, weights = self.masking.apply(tokens, segs, indices, epoch)
        return {
            "tokens": masked,
            "targets": tokens,
            "weights": weights,
            "segment_ids": segs,
            "positions": pos,
            "token_type_ids": np.zeros_like(tokens),
        }


class PairSource(Source):
    """BERT NSP / ALBERT SOP sentence pairs, one `[CLS] A [SEP] B [SEP]` per row, masked.

    NSP: with probability 1/2 B is replaced by segment A of another example (from another
    document when the corpus has several): nsp_labels 1 = random, 0 = real next (Hugging
    Face's convention). SOP: with probability 1/2 A and B swap: 1 = swapped, 0 = in order.
    """

    def __init__(self, sents: corpus_lib.Ragged, groups, examples, T: int, task: str, masking):
        self.sents, self.groups, self.examples = sents, groups, examples
        self.T, self.task, self.masking = T, task, masking
        self.num_examples = len(examples)
        self.ex_group = groups[examples[:, 0]] if len(examples) else groups[:0]
        self.multi_doc = len(np.unique(self.ex_group)) > 1

    def row_spec(self) -> RowSpec:
        return {
            **_token_spec(self.T),
            "nsp_labels": ((), np.int32),
            "nsp_weights": ((), np.float32),
        }

    def _span(self, lo: int, hi: int) -> np.ndarray:
        # Sentences are contiguous in the stream, so a sentence range is one slice.
        return self.sents.tokens[self.sents.offsets[lo] : self.sents.offsets[hi]]

    def pair(self, ex: int, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(segment A, segment B, label) of example `ex`; a pure function of seed/epoch/ex."""
        a_lo, a_hi, b_lo, b_hi = self.examples[ex].tolist()
        a, b = self._span(a_lo, a_hi), self._span(b_lo, b_hi)
        rng = example_rng(self.masking.seed, STREAM_PAIR, self.masking.epoch_key(epoch), ex)
        label = int(rng.random() < 0.5)
        if label and self.task == "sop":
            a, b = b, a
        elif label and self.task == "nsp":
            n = self.num_examples
            for _ in range(10):
                other = int(rng.integers(n - 1))
                other += other >= ex  # never the example itself
                if not self.multi_doc or self.ex_group[other] != self.ex_group[ex]:
                    break
            o_lo, o_hi = self.examples[other, :2].tolist()
            b = self._span(o_lo, o_hi)
        return a, b, label

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        out = self.empty(len(indices))
        for i, ex in enumerate(indices.tolist()):
            if ex < 0:
                continue
            a, b, label = self.pair(ex, epoch)
            tokens, types, n = pair_row(a, b, self.T, self.masking.cls_id, self.masking.sep_id)
            out["targets"][i] = tokens
            out["token_type_ids"][i] = types
            out["segment_ids"][i, :n] = 1
            out["positions"][i, :n] = np.arange(n)
            out["nsp_labels"][i] = label
            out["nsp_weights"][i] = 1.0
        out["tokens"], out["weights"] = self.masking.apply(
            out["targets"], out["segment_ids"], indices, epoch
        )
        return out


# Reader and source builder ---------------------------------------------------------------------


def read(
    config: DataConfig, tokenizer: Tokenizer, files: Sequence[str], what: str
) -> tuple[dict[str, Any], Callable[[], corpus_lib.TokenizedCorpus]]:
    """Documents ("docs"), or with a pair task sentences ("sents") and array "groups" (the
    document of each sentence)."""
    if config.pair_task == "none":
        return read_docs(config, tokenizer, files, what)
    params = {"kind": "sentences", "doc_split": config.doc_split}

    def build() -> corpus_lib.TokenizedCorpus:
        sents, groups, counts = corpus_lib.read_sentence_groups(
            files, config.doc_split, config.file_pattern, what
        )
        return corpus_lib.TokenizedCorpus(
            {"sents": corpus_lib.encode_ragged(tokenizer, sents)},
            {"groups": groups},
            {"invalid_utf8": counts},
        )

    return params, build


def mlm_source(split: Split) -> MlmSource | PairSource:
    """Packed rows of T tokens with 80/10/10 masking, or [CLS] A [SEP] B [SEP] pairs of T
    tokens with NSP/SOP labels when `data.pair_task` asks for them."""
    config, tokenizer, T = split.config, split.tokenizer, split.config.seq_len
    masking = Masking(config, tokenizer, config.shuffle_seed)
    if config.pair_task == "none":
        docs = split.corpus.fields["docs"]
        pieces = packing.wrapped_chunks(docs.offsets, T - 2, tokenizer.cls_id, tokenizer.sep_id)
        pieces = split.keep_pieces(pieces, "document chunks")
        layout = packing.pack([pieces.size], [T], config.pack)
        return MlmSource(docs.tokens, pieces, layout, T, masking)
    sents, groups = split.corpus.fields["sents"], split.corpus.arrays["groups"]
    examples = nsp_examples(sents.lengths, groups, T - 3)
    if len(examples) < 2:
        raise ValueError(
            f"{split.what} gives {len(examples)} sentence pair(s) for "
            f"{config.pair_task.upper()}; pairs need documents with at least two non-blank "
            "lines (check doc_split)."
        )
    keep = split.keep(len(examples), "sentence pairs")
    if keep is not None:
        examples = examples[keep]
    return PairSource(sents, groups, examples, T, config.pair_task, masking)


SPEC = ObjectiveSpec(
    name="mlm",
    formats=("text",),
    read=read,
    source=mlm_source,
    loss_weights={"mlm": "weights", "nsp": "nsp_weights"},
    main_loss="mlm",
    token_fields=("tokens",),
)
