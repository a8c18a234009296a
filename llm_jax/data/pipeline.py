"""Text on disk → packed, sharded, resumable batches for every objective.

    tokenize (cached) → split train/validation → pack into rows → seeded shuffle (grain)
    → batch (global B) → this host's slice of the batch → objective's builder
    → `jax.make_array_from_process_local_data` onto the mesh's data axes

The trainer's entry points:

    tok = build_tokenizer(cfg)                       # load cfg.tokenizer_path, or train + save
    train = make_iterator(cfg, tok, split="train", mesh=mesh)        # infinite, shuffled
    val = make_iterator(cfg, tok, split="validation", mesh=mesh)     # one pass, padded
    batch = next(train)                              # dict of global jax.Arrays [B, ...]
    state = train.get_state()                        # small JSON-able dict for the checkpoint
    train.set_state(state)                           # continue with exactly the next batch

Every host computes the same global order (a pure function of the seed), then builds only
its own rows of each global batch, so batches do not depend on the number of hosts and a
checkpoint restores onto any host count.
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.data import corpus as corpus_lib
from llm_jax.data import objectives as obj
from llm_jax.data import packing
from llm_jax.data.config import DataConfig
from llm_jax.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

DATA_AXES = ("data", "fsdp")
SPLITS = ("train", "validation")
_STATE_VERSION = 1


# Tokenizer -----------------------------------------------------------------------------------


def build_tokenizer(config: DataConfig) -> Tokenizer:
    """The run's tokenizer: loaded from `config.tokenizer_path` if one is saved there (its
    own settings then win over the config's), else trained on `config.paths` with the
    config's tokenizer settings and saved to `tokenizer_path` when given, so the next run
    and the checkpoint reuse it. For multi-host runs, train it once beforehand
    (`llm-jax tokenizer train`) and point every host at it."""
    path = config.tokenizer_path
    if path and (Path(path).is_file() or (Path(path) / "tokenizer.json").is_file()):
        return load_tokenizer(path, num_sentinels=config.num_sentinels)
    if config.format == "text":
        corpus: dict[str, Any] = {
            "inputs": corpus_lib.list_files(config.paths, config.file_pattern)
        }
    else:
        corpus = {"texts": _training_texts_of_table(config)}
    return train_tokenizer(
        **corpus,
        model_type=config.tokenizer_type,
        vocab_size=config.vocab_size,
        character_coverage=config.character_coverage,
        byte_fallback=config.byte_fallback,
        num_sentinels=config.num_sentinels,
        max_sentences=config.tokenizer_max_sentences,
        out_dir=path,
    )


def _training_texts_of_table(config: DataConfig) -> list[str]:
    # A tokenizer for a TSV / fastText corpus learns from the text cells only, not from
    # references or label names.
    if config.format == "fasttext":
        _, texts, _ = corpus_lib.read_fasttext(config.paths, config.file_pattern)
        return texts
    cols = (
        [config.source_column, config.target_column]
        if config.objective == "seq2seq"
        else list(config.text_columns)
    )
    cells, _ = corpus_lib.read_tsv_columns(config.paths, cols, config.file_pattern)
    return [c for col in cells for c in col]


# Tokenized corpora ---------------------------------------------------------------------------


def tokenize_corpus(
    config: DataConfig,
    tokenizer: Tokenizer,
    paths: Sequence[str],
    what: str = "DataConfig.paths",
) -> corpus_lib.TokenizedCorpus:
    """Read and tokenize the corpus at `paths` the way `config.objective` needs it, cached.

    Fields: "docs" (clm, mlm, span_corruption); "sents" + array "groups" (mlm with NSP/SOP);
    "source", "target" (seq2seq); "text_a" [+ "text_b"] + array "labels" (classification).
    """
    files = corpus_lib.list_files(paths, config.file_pattern, what)
    pattern = config.file_pattern
    if config.objective == "seq2seq":
        cols = [config.source_column, config.target_column]
        params: dict[str, Any] = {"kind": "tsv", "columns": cols}

        def build() -> corpus_lib.TokenizedCorpus:
            (src, tgt), counts = corpus_lib.read_tsv_columns(files, cols, pattern, what)
            fields = {
                "source": corpus_lib.encode_ragged(tokenizer, src),
                "target": corpus_lib.encode_ragged(tokenizer, tgt),
            }
            return corpus_lib.TokenizedCorpus(fields, {}, {"invalid_utf8": counts})

    elif config.objective == "classification":
        params = {
            "kind": config.format,
            "label_column": config.label_column,
            "text_columns": list(config.text_columns),
        }

        def build() -> corpus_lib.TokenizedCorpus:
            if config.format == "fasttext":
                labels, text_a, counts = corpus_lib.read_fasttext(files, pattern, what)
                texts = [text_a]
            else:
                cells, counts = corpus_lib.read_tsv_columns(
                    files, [config.label_column, *config.text_columns], pattern, what
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

    elif config.objective == "mlm" and config.pair_task != "none":
        params = {"kind": "sentences", "doc_split": config.doc_split}

        def build() -> corpus_lib.TokenizedCorpus:
            sents, groups, counts = corpus_lib.read_sentence_groups(
                files, config.doc_split, pattern, what
            )
            return corpus_lib.TokenizedCorpus(
                {"sents": corpus_lib.encode_ragged(tokenizer, sents)},
                {"groups": groups},
                {"invalid_utf8": counts},
            )

    else:
        params = {"kind": "docs", "doc_split": config.doc_split}

        def build() -> corpus_lib.TokenizedCorpus:
            docs, counts = corpus_lib.read_documents(files, config.doc_split, pattern, what)
            return corpus_lib.TokenizedCorpus(
                {"docs": corpus_lib.encode_ragged(tokenizer, docs)}, {}, {"invalid_utf8": counts}
            )

    return corpus_lib.cached_tokenize(
        files, tokenizer, params, build, config.cache_dir, config.use_cache
    )


def split_indices(
    n: int, fraction: float, seed: int, split: str, unit: str = "examples"
) -> np.ndarray:
    """Sorted indices of `split` when round(n * fraction) of n items are held out for
    validation by a permutation seeded with `seed` (independent of the shuffle seed)."""
    n_val = round(n * fraction)
    if not 0 < n_val < n:
        raise ValueError(
            f"DataConfig.validation_fraction={fraction} of {n} {unit} leaves "
            f"{n_val} for validation and {n - n_val} for training; choose a fraction that "
            "keeps both non-empty, or give validation_paths."
        )
    perm = np.random.default_rng(seed).permutation(n)
    chosen = perm[:n_val] if split == "validation" else perm[n_val:]
    return np.sort(chosen)


# Sources: random access to one split's examples ---------------------------------------------


class Source(abc.ABC):
    """Random access to a split's examples: `build(indices, epoch)` is the pure, seeded
    function that turns example ids (-1 = an all-padding row) into a numpy batch."""

    num_examples: int

    @abc.abstractmethod
    def row_spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
        """Per-example shape and dtype of each batch entry (the batch adds a leading B)."""

    @abc.abstractmethod
    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        """Batch for example ids `indices` [b] seen in epoch `epoch`."""

    def empty(self, b: int) -> dict[str, np.ndarray]:
        return {k: np.zeros((b, *s), d) for k, (s, d) in self.row_spec().items()}


class ClmSource(Source):
    """Packed causal-LM rows (see `objectives.clm_batch`)."""

    def __init__(self, stream: np.ndarray, pieces: packing.Pieces, layout: packing.Packing, T: int):
        self.stream, self.pieces, self.layout, self.T = stream, pieces, layout, T
        self.num_examples = layout.num_rows

    def row_spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
        shape = (self.T,)
        return {
            "tokens": (shape, np.int32),
            "targets": (shape, np.int32),
            "weights": (shape, np.float32),
            "segment_ids": (shape, np.int32),
            "positions": (shape, np.int32),
        }

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        pid, brow, seg = packing.row_pieces(self.layout, indices)
        rows, segs, pos = packing.gather(
            self.stream,
            self.pieces,
            self.layout.offsets[0],
            pid,
            brow,
            seg,
            (len(indices), self.T + 1),
        )
        return obj.clm_batch(rows, segs, pos)


class _Masking:
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
        self.random_ids = obj.ordinary_ids(tokenizer.vocab_size, special)
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
            rng = obj.example_rng(self.seed, obj.STREAM_MLM, self.epoch_key(epoch), ex)
            masked[i], weights[i] = obj.mlm_mask(
                tokens[i],
                candidates[i],
                rng,
                mask_id=self.mask_id,
                random_ids=self.random_ids,
                **self.kwargs,
            )
        return masked, weights


class MlmSource(Source):
    """Packed masked-LM rows: each document chunk is `[CLS] chunk [SEP]`, its own segment."""

    def __init__(self, stream, pieces, layout, T: int, masking: _Masking):
        self.stream, self.pieces, self.layout, self.T = stream, pieces, layout, T
        self.masking = masking
        self.num_examples = layout.num_rows

    def row_spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
        shape = (self.T,)
        spec = {k: (shape, np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        return {**spec, "weights": (shape, np.float32), "token_type_ids": (shape, np.int32)}

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        pid, brow, seg = packing.row_pieces(self.layout, indices)
        tokens, segs, pos = packing.gather(
            self.stream,
            self.pieces,
            self.layout.offsets[0],
            pid,
            brow,
            seg,
            (len(indices), self.T),
        )
        masked, weights = self.masking.apply(tokens, segs, indices, epoch)
        return {
            "tokens": masked,
            "targets": tokens,
            "weights": weights,
            "segment_ids": segs,
            "positions": pos,
            "token_type_ids": np.zeros_like(tokens),
        }


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

    def row_spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
        shape = (self.T,)
        spec = {k: (shape, np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
        return {
            **spec,
            "weights": (shape, np.float32),
            "token_type_ids": (shape, np.int32),
            "nsp_labels": ((), np.int32),
        }

    def _span(self, lo: int, hi: int) -> np.ndarray:
        # Sentences are contiguous in the stream, so a sentence range is one slice.
        return self.sents.tokens[self.sents.offsets[lo] : self.sents.offsets[hi]]

    def pair(self, ex: int, epoch: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(segment A, segment B, label) of example `ex`; a pure function of seed/epoch/ex."""
        a_lo, a_hi, b_lo, b_hi = self.examples[ex].tolist()
        a, b = self._span(a_lo, a_hi), self._span(b_lo, b_hi)
        rng = obj.example_rng(self.masking.seed, obj.STREAM_PAIR, self.masking.epoch_key(epoch), ex)
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
        b = len(indices)
        out = self.empty(b)
        for i, ex in enumerate(indices.tolist()):
            if ex < 0:
                continue
            a, bb, label = self.pair(ex, epoch)
            tokens, types, n = obj.pair_row(a, bb, self.T, self.masking.cls_id, self.masking.sep_id)
            out["targets"][i] = tokens
            out["token_type_ids"][i] = types
            out["segment_ids"][i, :n] = 1
            out["positions"][i, :n] = np.arange(n)
            out["nsp_labels"][i] = label
        out["tokens"], out["weights"] = self.masking.apply(
            out["targets"], out["segment_ids"], indices, epoch
        )
        return out


def _enc_dec_spec(T: int, S: int) -> dict[str, tuple[tuple[int, ...], type]]:
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


def _decoder_side(targets: np.ndarray, segs: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "decoder_tokens": obj.shift_right(targets, segs, start_id=0),
        "decoder_targets": targets,
        "decoder_weights": (segs != 0).astype(np.float32),
        "decoder_segment_ids": segs,
        "decoder_positions": pos,
    }


class SpanCorruptionSource(Source):
    """T5 span corruption: raw chunks noised per draw, packed into encoder rows [T] and
    decoder rows [S]. Each chunk's corrupted lengths depend only on its length, so the
    packing is fixed while the noise changes every epoch (when dynamic)."""

    def __init__(self, stream, pieces, layout, T: int, S: int, config: DataConfig, tokenizer):
        tokenizer.require("eos", why="objective='span_corruption'")
        self.stream, self.pieces, self.layout, self.T, self.S = stream, pieces, layout, T, S
        self.num_examples = layout.num_rows
        self.seed = config.shuffle_seed
        self.dynamic = config.dynamic_masking
        self.density = config.noise_density
        self.mean_span = config.mean_noise_span_length
        self.sentinels = tokenizer.sentinel_ids
        self.eos = tokenizer.eos_id

    def row_spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
        return _enc_dec_spec(self.T, self.S)

    def corrupt(self, piece: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of one chunk, EOS appended to both."""
        start, length = int(self.pieces.start[piece]), int(self.pieces.length[piece])
        tokens = np.asarray(self.stream[start : start + length])
        rng = obj.example_rng(self.seed, obj.STREAM_NOISE, epoch if self.dynamic else 0, piece)
        noise = obj.random_spans_noise_mask(length, self.density, self.mean_span, rng)
        inputs, targets = obj.span_corrupt(tokens, noise, self.sentinels)
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
            **_decoder_side(dec[0], dec[1], dec[2]),
        }


class Seq2SeqSource(Source):
    """Source → target pairs (EOS-terminated, truncated to fit), optionally packed."""

    def __init__(self, src, tgt, src_pieces, tgt_pieces, layout, T: int, S: int):
        self.src, self.tgt = src, tgt
        self.src_pieces, self.tgt_pieces, self.layout = src_pieces, tgt_pieces, layout
        self.T, self.S = T, S
        self.num_examples = layout.num_rows

    def row_spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
        return _enc_dec_spec(self.T, self.S)

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
            **_decoder_side(d_tok, d_seg, d_pos),
        }


class ClassificationSource(Source):
    """`[CLS] text [SEP]` or `[CLS] a [SEP] b [SEP]` rows with an integer label each."""

    def __init__(self, text_a, text_b, labels: np.ndarray, T: int, tokenizer: Tokenizer):
        tokenizer.require("cls", "sep", why="objective='classification'")
        self.text_a, self.text_b, self.labels, self.T = text_a, text_b, labels, T
        self.cls_id, self.sep_id = tokenizer.cls_id, tokenizer.sep_id
        self.num_examples = len(labels)

    def row_spec(self) -> dict[str, tuple[tuple[int, ...], type]]:
        spec = {
            k: ((self.T,), np.int32)
            for k in ("tokens", "token_type_ids", "segment_ids", "positions")
        }
        return {**spec, "labels": ((), np.int32)}

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        out = self.empty(len(indices))
        for i, ex in enumerate(indices.tolist()):
            if ex < 0:
                continue
            b = None if self.text_b is None else self.text_b[ex]
            tokens, types, n = obj.pair_row(self.text_a[ex], b, self.T, self.cls_id, self.sep_id)
            out["tokens"][i], out["token_type_ids"][i] = tokens, types
            out["segment_ids"][i, :n] = 1
            out["positions"][i, :n] = np.arange(n)
            out["labels"][i] = self.labels[ex]
        return out


# Building a split -----------------------------------------------------------------------------


def load_source(config: DataConfig, tokenizer: Tokenizer, split: str = "train") -> Source:
    """The examples of one split ("train" or "validation") of `config`'s corpus.

    Validation is `config.validation_paths` if given, else `validation_fraction` of the
    pieces (documents / row-sized chunks of them, pairs, labelled texts) chosen by a
    permutation seeded with `split_seed`.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}.")
    if split == "validation" and not config.has_validation:
        raise ValueError(
            "no validation data: set DataConfig.validation_fraction (e.g. 0.05) or "
            "DataConfig.validation_paths."
        )
    separate = split == "validation" and bool(config.validation_paths)
    paths = config.validation_paths if separate else config.paths
    what = "DataConfig.validation_paths" if separate else "DataConfig.paths"
    tc = tokenize_corpus(config, tokenizer, paths, what)
    fraction = 0.0 if config.validation_paths else config.validation_fraction

    def keep(n: int, unit: str) -> np.ndarray | None:
        if fraction == 0:
            return None
        return split_indices(n, fraction, config.split_seed, split, unit)

    T = config.seq_len
    objective = config.objective
    if objective == "clm":
        if config.add_bos:
            tokenizer.require("bos", why="DataConfig.add_bos=True")
        if config.add_eos:
            tokenizer.require("eos", why="DataConfig.add_eos=True")
        docs = tc.fields["docs"]
        pieces = packing.overlapping_chunks(
            docs.offsets,
            T + 1,
            tokenizer.bos_id if config.add_bos else None,
            tokenizer.eos_id if config.add_eos else None,
        )
        pieces = _select(pieces, keep(len(pieces), "document chunks"))
        layout = packing.pack([pieces.size], [T + 1], config.pack)
        return ClmSource(docs.tokens, pieces, layout, T)
    if objective == "mlm" and config.pair_task == "none":
        masking = _Masking(config, tokenizer, config.shuffle_seed)
        docs = tc.fields["docs"]
        pieces = packing.wrapped_chunks(docs.offsets, T - 2, tokenizer.cls_id, tokenizer.sep_id)
        pieces = _select(pieces, keep(len(pieces), "document chunks"))
        layout = packing.pack([pieces.size], [T], config.pack)
        return MlmSource(docs.tokens, pieces, layout, T, masking)
    if objective == "mlm":
        masking = _Masking(config, tokenizer, config.shuffle_seed)
        sents, groups = tc.fields["sents"], tc.arrays["groups"]
        examples = nsp_examples(sents.lengths, groups, T - 3)
        if len(examples) < 2:
            raise ValueError(
                f"{what} gives {len(examples)} sentence pair(s) for {config.pair_task.upper()}; "
                "pairs need documents with at least two non-blank lines (check doc_split)."
            )
        sel = keep(len(examples), "sentence pairs")
        if sel is not None:
            examples = examples[sel]
        return PairSource(sents, groups, examples, T, config.pair_task, masking)
    if objective == "span_corruption":
        docs = tc.fields["docs"]
        raw, derived_S = obj.span_corruption_raw_length(
            T, config.target_seq_len, config.noise_density, config.mean_noise_span_length
        )
        S = config.target_seq_len or derived_S
        _, spans = obj.noise_counts(raw, config.noise_density, config.mean_noise_span_length)
        if spans > tokenizer.num_sentinels:
            raise ValueError(
                f"span corruption of {raw}-token chunks (seq_len={T}) makes {spans} noise spans "
                f"but the tokenizer has {tokenizer.num_sentinels} sentinels; lower seq_len, "
                "raise mean_noise_span_length, or use a tokenizer with more sentinels."
            )
        pieces = packing.wrapped_chunks(docs.offsets, raw, min_tokens=2)
        pieces = _select(pieces, keep(len(pieces), "document chunks"))
        lengths = np.asarray(
            [
                obj.span_corruption_lengths(n, config.noise_density, config.mean_noise_span_length)
                for n in pieces.length.tolist()
            ],
            np.int64,
        ).reshape(-1, 2)
        layout = packing.pack([lengths[:, 0], lengths[:, 1]], [T, S], config.pack)
        return SpanCorruptionSource(docs.tokens, pieces, layout, T, S, config, tokenizer)
    if objective == "seq2seq":
        tokenizer.require("eos", why="objective='seq2seq'")
        S = config.target_seq_len or T
        src, tgt = tc.fields["source"], tc.fields["target"]
        sel = keep(len(src), "pairs")
        idx = np.arange(len(src)) if sel is None else sel
        src_pieces = _truncated(src, idx, T - 1, tokenizer.eos_id, "source", "seq_len")
        tgt_pieces = _truncated(tgt, idx, S - 1, tokenizer.eos_id, "target", "target_seq_len")
        layout = packing.pack([src_pieces.size, tgt_pieces.size], [T, S], config.pack)
        return Seq2SeqSource(src.tokens, tgt.tokens, src_pieces, tgt_pieces, layout, T, S)
    # classification
    labels = _label_codes(config, tokenizer, tc, separate)
    a = tc.fields["text_a"]
    b = tc.fields.get("text_b")
    sel = keep(len(a), "labelled examples")
    if sel is not None:
        a, b, labels = _subset(a, sel), None if b is None else _subset(b, sel), labels[sel]
    return ClassificationSource(a, b, labels, T, tokenizer)


def _select(pieces: packing.Pieces, index: np.ndarray | None) -> packing.Pieces:
    return pieces if index is None else pieces.select(index)


def _subset(r: corpus_lib.Ragged, index: np.ndarray) -> corpus_lib.Ragged:
    lengths = r.lengths[index]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = (
        np.concatenate([r[i] for i in index.tolist()]).astype(np.int32)
        if len(index)
        else np.zeros(0, np.int32)
    )
    return corpus_lib.Ragged(tokens, offsets)


def _truncated(
    r: corpus_lib.Ragged, index: np.ndarray, max_tokens: int, eos: int, side: str, field: str
) -> packing.Pieces:
    lengths = r.lengths[index]
    cut = int((lengths > max_tokens).sum())
    if cut:
        warnings.warn(
            f"{cut} of {len(index)} {side} texts are longer than {max_tokens} tokens and were "
            f"truncated; raise DataConfig.{field} to keep them whole.",
            stacklevel=3,
        )
    n = len(index)
    return packing.Pieces(
        start=r.offsets[index],
        length=np.minimum(lengths, max_tokens),
        prefix=np.full(n, -1, np.int32),
        suffix=np.full(n, eos, np.int32),
    )


def _label_codes(
    config: DataConfig, tokenizer: Tokenizer, tc: corpus_lib.TokenizedCorpus, separate: bool
) -> np.ndarray:
    values = tc.meta["label_values"]
    names = config.label_names
    if names is None:
        # Label ids must mean the same in both splits: take them from the training corpus.
        names = (
            tokenize_corpus(config, tokenizer, config.paths).meta["label_values"]
            if separate
            else values
        )
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"labels {unknown} in the data are not in DataConfig.label_names={list(names)}; "
            "add them there."
        )
    remap = np.asarray([list(names).index(v) for v in values], np.int32)
    return remap[tc.arrays["labels"]]


# Sharding -------------------------------------------------------------------------------------


def data_shards(mesh: Mesh, data_axes: Sequence[str] = DATA_AXES) -> tuple[tuple[str, ...], int]:
    """The data axes present in `mesh` and the number of batch shards they make."""
    present = tuple(a for a in data_axes if a in mesh.axis_names)
    if not present:
        raise ValueError(
            f"none of the data axes {list(data_axes)} is in the mesh axes "
            f"{list(mesh.axis_names)}; name the batch axes of this mesh in `data_axes`."
        )
    return present, math.prod(mesh.shape[a] for a in present)


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] = DATA_AXES) -> NamedSharding:
    """`NamedSharding(mesh, P(data_axes))`: the batch dimension split over the data axes.

    Axes named in `data_axes` but absent from the mesh are left out, so the default
    ('data', 'fsdp') serves DP-only and FSDP meshes alike.
    """
    present, _ = data_shards(mesh, data_axes)
    return NamedSharding(mesh, PartitionSpec(present))


def check_batch_size(
    batch_size: int,
    mesh: Mesh | None = None,
    data_axes: Sequence[str] = DATA_AXES,
    process_count: int = 1,
) -> None:
    """ValueError unless the global batch divides over the mesh's data shards and the hosts."""
    need, why = process_count, f"{process_count} hosts"
    if mesh is not None:
        present, shards = data_shards(mesh, data_axes)
        sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in present)
        need, why = math.lcm(shards, process_count), f"{shards} data shards ({sizes})"
        if process_count > 1:
            why += f" and {process_count} hosts"
    if batch_size % need:
        options = ", ".join(str(need * k) for k in range(1, 5))
        raise ValueError(
            f"DataConfig.batch_size={batch_size} does not divide evenly over {why}; use a "
            f"multiple of {need}, e.g. {options}."
        )


def host_slice(
    batch_size: int, process_index: int, process_count: int, sharding: NamedSharding | None = None
) -> slice:
    """Rows of the global batch this host builds.

    Without a sharding: the process_index-th of process_count equal contiguous blocks. With
    one: exactly the rows this process's devices hold (what
    `make_array_from_process_local_data` expects), which is the same block for the usual
    process-major device order and stays correct when hosts share (replicate) rows.
    """
    if sharding is None:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
        if batch_size % process_count:
            check_batch_size(batch_size, None, process_count=process_count)
        n = batch_size // process_count
        return slice(process_index * n, (process_index + 1) * n)
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    spans = sorted(
        {
            (s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
            for s in index_map.values()
        }
    )
    lo, hi = spans[0][0], max(h for _, h in spans)
    covered = sum(h - l for l, h in spans)
    if covered != hi - lo:
        raise ValueError(
            "this host's devices hold non-contiguous rows of the batch; build the mesh with "
            "jax.make_mesh (process-major device order)."
        )
    return slice(lo, hi)


# Iterator -------------------------------------------------------------------------------------


class DataIterator:
    """Deterministic, resumable iterator over global batches of one split, built on grain.

    The order is `grain.MapDataset.range(N).shuffle(seed).batch(B).repeat(epochs)`: a lazy
    seeded permutation, reseeded every epoch, batched within the epoch. Batch k is a pure
    function of (seed, k), so the state is just k plus what checks that it still applies.

    Attributes:
        source: the split's examples.
        steps_per_epoch: batches per pass over the split.
        order: the grain MapDataset of global example ids per step.
        dataset: the grain MapDataset of this host's numpy batches (random access by step).
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        mesh: Mesh | None = None,
        data_axes: Sequence[str] = DATA_AXES,
        process_index: int | None = None,
        process_count: int | None = None,
        num_workers: int = 0,
        prefetch: int = 2,
        split: str = "train",
    ) -> None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        check_batch_size(batch_size, mesh, data_axes, process_count)
        self.sharding = None if mesh is None else batch_sharding(mesh, data_axes)
        self.rows = host_slice(batch_size, process_index, process_count, self.sharding)
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.split, self.num_epochs = split, num_epochs
        n = source.num_examples
        self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the {split} split has {n} example(s) (packed rows / pairs) but "
                f"DataConfig.batch_size={batch_size}; lower batch_size or seq_len, or add data."
            )
        ds = grain.MapDataset.range(n)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        self.order = ds  # global example ids [B] of each step
        self.dataset = ds.map_with_index(self._local_batch)
        self._read = grain.ReadOptions(
            num_threads=num_workers, prefetch_buffer_size=prefetch if num_workers else 0
        )
        self._it = iter(self.dataset.to_iter_dataset(self._read))

    def _local_batch(self, step: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        if len(indices) < self.batch_size:  # the last validation batch: pad with empty rows
            indices = np.concatenate([indices, np.full(self.batch_size - len(indices), -1)])
        return self.source.build(indices[self.rows], step // self.steps_per_epoch)

    def example_indices(self, step: int) -> np.ndarray:
        """int64 [<= B]: the split's example ids in global batch `step` (all hosts)."""
        return np.asarray(self.order[step], np.int64)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's numpy rows of global batch `step` (no iterator state involved)."""
        return self.dataset[step]

    @property
    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shape, dtype (and sharding, with a mesh) of each batch entry."""
        return {
            k: jax.ShapeDtypeStruct((self.batch_size, *s), d, sharding=self.sharding)
            for k, (s, d) in self.source.row_spec().items()
        }

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        local = next(self._it)
        if self.sharding is None:
            return local
        return {
            k: jax.make_array_from_process_local_data(
                self.sharding, v, (self.batch_size, *v.shape[1:])
            )
            for k, v in local.items()
        }

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an infinite (training) iterator has no len().")
        return self.steps_per_epoch * self.num_epochs

    def get_state(self) -> dict[str, Any]:
        """JSON-able position: the next step, its epoch and offset, and the order's identity."""
        step = int(self._it.get_state()["next_index"])
        return {
            "version": _STATE_VERSION,
            "split": self.split,
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "position": step % self.steps_per_epoch,
            "seed": self.seed,
            "num_examples": self.source.num_examples,
            "batch_size": self.batch_size,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `get_state`): the next batch is the one that followed.

        Raises ValueError if the state belongs to a different order (seed, data, batch size),
        since resuming it would silently repeat or skip data.
        """
        mine = self.get_state()
        for key in ("version", "split", "seed", "num_examples", "batch_size"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data iterator state has {key}={state.get(key)!r} but this iterator has "
                    f"{mine[key]!r}; restore with the DataConfig (and corpus) the checkpoint "
                    "was written with."
                )
        self._it.set_state({"next_index": int(state["step"])})


def make_iterator(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    split: str = "train",
    mesh: Mesh | None = None,
    data_axes: Sequence[str] = DATA_AXES,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Batches of one split of `config`'s corpus.

    "train" is infinite and shuffled (`shuffle_seed`), dropping each epoch's last partial
    batch; "validation" is one ordered pass whose last batch is padded with empty rows
    (segment ids 0, weights 0). With a `mesh`, batches are global `jax.Array`s sharded as
    `batch_sharding(mesh, data_axes)`; without one, this host's numpy rows.

    Args:
        process_index, process_count: default to jax's; pass them to simulate hosts.
    """
    if mesh is not None:
        check_batch_size(
            config.batch_size,
            mesh,
            data_axes,
            jax.process_count() if process_count is None else process_count,
        )
    source = load_source(config, tokenizer, split)
    train = split == "train"
    return DataIterator(
        source,
        config.batch_size,
        shuffle=config.shuffle and train,
        seed=config.shuffle_seed,
        num_epochs=None if train else 1,
        drop_remainder=train,
        mesh=mesh,
        data_axes=data_axes,
        process_index=process_index,
        process_count=process_count,
        num_workers=config.num_workers,
        prefetch=config.prefetch,
        split=split,
    )
