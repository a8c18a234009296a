"""Tokenizers: SentencePiece (BPE / unigram) trained in-process, and a character tokenizer.

Both share one interface (`Tokenizer`): `encode(str) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, named special ids and T5 sentinels, `save(dir)`; `load_tokenizer(path)`
reads either back. The id layout of tokenizers trained here is

    0 <pad>  1 <unk>  2 <s>  3 </s>  4 <cls>  5 <sep>  6 <mask>   (named special tokens)
    7 .. 262  <0x00> .. <0xFF>                                    (byte fallback, if on)
    ...       ordinary pieces / characters
    V-100 .. V-1  <extra_id_99> .. <extra_id_0>                   (T5 sentinels, if any)

pad = 0 matches the pipeline's conventions (segment id 0 = padding, T5 decoder start =
pad). The ids are written into `tokenizer.json` beside the model, so model code never
hard-codes them. Sentinels sit outside the SentencePiece model and count down from the
last id, exactly as T5's vocabulary appends its extra ids.

Round trip: with `normalization_rule_name="identity"`, `remove_extra_whitespaces=False`
and byte fallback, `decode(encode(text)) == text` for any text (checked in the tests).
"""

from __future__ import annotations

import abc
import collections
import functools
import hashlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from llm_jax.data import corpus

SPECIAL_NAMES = ("pad", "unk", "bos", "eos", "cls", "sep", "mask")
SPECIAL_PIECES = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<s>",
    "eos": "</s>",
    "cls": "<cls>",
    "sep": "<sep>",
    "mask": "<mask>",
}
MAX_SENTINELS = 100
MODEL_TYPES = ("unigram", "bpe", "char")
_META = "tokenizer.json"
_SPM_FILE = "spm.model"
_FORMAT_VERSION = 1


def sentinel_piece(i: int) -> str:
    return f"<extra_id_{i}>"


class Tokenizer(abc.ABC):
    """Text ↔ ids with named special tokens; see the module docstring for the id layout.

    Attributes:
        model_type: "unigram", "bpe", "char", or "sentencepiece" for a foreign .model file.
        special_ids: name → id for the named special tokens this vocabulary has.
        num_sentinels: how many T5 sentinels `<extra_id_i>` end the vocabulary.
    """

    model_type: str

    def __init__(self, special_ids: dict[str, int], num_sentinels: int) -> None:
        unknown = set(special_ids) - set(SPECIAL_NAMES)
        if unknown:
            raise ValueError(f"unknown special token names {sorted(unknown)}; use {SPECIAL_NAMES}")
        if not 0 <= num_sentinels <= MAX_SENTINELS:
            raise ValueError(f"num_sentinels={num_sentinels} must be in [0, {MAX_SENTINELS}].")
        self.special_ids = dict(special_ids)
        self.num_sentinels = num_sentinels

    # Interface ------------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """V, the number of ids (sentinels included)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; never emits special or sentinel ids."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts (SentencePiece runs them in parallel)."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def _decode_ordinary(self, ids: list[int]) -> str:
        """Text of a run of ids that are neither named specials nor sentinels."""

    @abc.abstractmethod
    def _ordinary_piece(self, i: int) -> str:
        """Surface piece of one ordinary id (for inspection)."""

    @abc.abstractmethod
    def _payload(self, out: Path) -> dict[str, Any]:
        """Write model files into `out`; return the extra metadata to store."""

    # Shared behaviour -----------------------------------------------------------------------

    def _check_id(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}).")
        return i

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Special tokens and sentinels show as their pieces (`<mask>`,
        `<extra_id_0>`) unless `skip_special_tokens`; ordinary ids decode exactly."""
        special = self._special_to_piece
        out: list[str] = []
        run: list[int] = []
        for i in map(self._check_id, ids):
            if i in special:
                if run:
                    out.append(self._decode_ordinary(run))
                    run = []
                if not skip_special_tokens:
                    out.append(special[i])
            else:
                run.append(i)
        if run:
            out.append(self._decode_ordinary(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        i = self._check_id(i)
        return self._special_to_piece.get(i) or self._ordinary_piece(i)

    @functools.cached_property
    def _special_to_piece(self) -> dict[int, str]:
        out = {i: SPECIAL_PIECES[n] for n, i in self.special_ids.items()}
        out.update({self.sentinel_id(k): sentinel_piece(k) for k in range(self.num_sentinels)})
        return out

    def sentinel_id(self, i: int) -> int:
        """Id of T5's `<extra_id_i>`: the last ids of the vocabulary, extra_id_0 highest."""
        if not 0 <= i < self.num_sentinels:
            raise ValueError(
                f"sentinel {i} does not exist: this tokenizer has num_sentinels="
                f"{self.num_sentinels}; retrain with more sentinels (T5 uses 100)."
            )
        return self.vocab_size - 1 - i

    @property
    def sentinel_ids(self) -> np.ndarray:
        """int32 [num_sentinels]: sentinel_ids[i] = sentinel_id(i)."""
        return (self.vocab_size - 1 - np.arange(self.num_sentinels)).astype(np.int32)

    @property
    def all_special_ids(self) -> np.ndarray:
        """Sorted int32 ids of every named special token and sentinel (never masked/sampled)."""
        ids = set(self.special_ids.values()) | set(self.sentinel_ids.tolist())
        return np.asarray(sorted(ids), np.int32)

    def _named(self, name: str) -> int | None:
        return self.special_ids.get(name)

    @property
    def pad_id(self) -> int | None:
        return self._named("pad")

    @property
    def unk_id(self) -> int | None:
        return self._named("unk")

    @property
    def bos_id(self) -> int | None:
        return self._named("bos")

    @property
    def eos_id(self) -> int | None:
        return self._named("eos")

    @property
    def cls_id(self) -> int | None:
        return self._named("cls")

    @property
    def sep_id(self) -> int | None:
        return self._named("sep")

    @property
    def mask_id(self) -> int | None:
        return self._named("mask")

    def require(self, *names: str, why: str) -> None:
        """ValueError unless every named special token exists (e.g. `require("mask", why=...)`)."""
        missing = [n for n in names if n not in self.special_ids]
        if missing:
            raise ValueError(
                f"{why} needs the special token(s) {missing}, which this tokenizer lacks; "
                "train one with `llm-jax tokenizer train` (it adds <pad> <unk> <s> </s> <cls> "
                "<sep> <mask>)."
            )

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the model and `tokenizer.json` (type, vocab size, special ids) into a folder."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": _FORMAT_VERSION,
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "special_ids": self.special_ids,
            "num_sentinels": self.num_sentinels,
            # Redundant with vocab_size and num_sentinels; spelled out for human readers.
            "sentinels": (
                {
                    "extra_id_0": self.sentinel_id(0),
                    "lowest": self.sentinel_id(self.num_sentinels - 1),
                }
                if self.num_sentinels
                else {}
            ),
            **self._payload(out),
        }
        (out / _META).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        return out

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of everything that determines the ids (keys the token cache)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.model_type, self.special_ids, self.num_sentinels]).encode())
        h.update(self._model_bytes())
        return h.hexdigest()

    @abc.abstractmethod
    def _model_bytes(self) -> bytes: ...

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_type={self.model_type!r}, vocab_size={self.vocab_size}, "
            f"special_ids={self.special_ids}, num_sentinels={self.num_sentinels})"
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus T5 sentinels appended after its pieces."""

    def __init__(
        self,
        model_proto: bytes,
        *,
        model_type: str = "sentencepiece",
        special_ids: dict[str, int] | None = None,
        num_sentinels: int = 0,
    ) -> None:
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self._pieces = self._sp.get_piece_size()
        if special_ids is None:
            special_ids = _discover_special_ids(self._sp)
        self.model_type = model_type
        super().__init__(special_ids, num_sentinels)

    @property
    def vocab_size(self) -> int:
        return self._pieces + self.num_sentinels

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=os.cpu_count() or 1) if texts else []

    def _decode_ordinary(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _ordinary_piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def _payload(self, out: Path) -> dict[str, Any]:
        (out / _SPM_FILE).write_bytes(self._proto)
        return {"model_file": _SPM_FILE}

    def _model_bytes(self) -> bytes:
        return self._proto


def _discover_special_ids(sp: spm.SentencePieceProcessor) -> dict[str, int]:
    """Special ids of a SentencePiece model trained elsewhere (e.g. T5's spiece.model)."""
    ids = {"pad": sp.pad_id(), "unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id()}
    out = {k: v for k, v in ids.items() if v >= 0}
    for name in ("cls", "sep", "mask"):
        for piece in (SPECIAL_PIECES[name], f"[{name.upper()}]"):
            i = sp.piece_to_id(piece)
            if i != sp.unk_id() and sp.id_to_piece(i) == piece:
                out[name] = i
                break
    return out


class CharTokenizer(Tokenizer):
    """One id per character (the classic tiny-Shakespeare setup), same interface.

    Characters outside the vocabulary become their UTF-8 bytes (byte fallback) or <unk>.
    """

    model_type = "char"

    def __init__(
        self, chars: Sequence[str], *, byte_fallback: bool = True, num_sentinels: int = 0
    ) -> None:
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer chars must be distinct single characters.")
        super().__init__({n: i for i, n in enumerate(SPECIAL_NAMES)}, num_sentinels)
        self.chars = list(chars)
        self.byte_fallback = byte_fallback
        self._byte0 = len(SPECIAL_NAMES)
        self._char0 = self._byte0 + (256 if byte_fallback else 0)
        self._vocab = self._char0 + len(self.chars) + num_sentinels
        cps = np.asarray([ord(c) for c in self.chars], np.int64)
        order = np.argsort(cps)
        self._sorted_cps = cps[order]
        self._sorted_ids = (order + self._char0).astype(np.int32)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.int64)
        pos = np.searchsorted(self._sorted_cps, cps).clip(0, max(len(self._sorted_cps) - 1, 0))
        found = self._sorted_cps[pos] == cps if len(self._sorted_cps) else np.zeros(len(cps), bool)
        ids = np.where(found, self._sorted_ids[pos] if len(self._sorted_ids) else 0, -1)
        if found.all():
            return ids.tolist()
        # Rare path: characters outside the vocabulary expand to bytes (or <unk>).
        out: list[int] = []
        for i, ch in zip(ids.tolist(), text, strict=True):
            if i >= 0:
                out.append(i)
            elif self.byte_fallback:
                out.extend(self._byte0 + b for b in ch.encode("utf-8", "surrogatepass"))
            else:
                out.append(self.special_ids["unk"])
        return out

    def _decode_ordinary(self, ids: list[int]) -> str:
        out: list[str] = []
        pending = bytearray()
        for i in ids:
            if self._byte0 <= i < self._char0:
                pending.append(i - self._byte0)
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending = bytearray()
            out.append(self.chars[i - self._char0])
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def _ordinary_piece(self, i: int) -> str:
        if self._byte0 <= i < self._char0:
            return f"<0x{i - self._byte0:02X}>"
        return self.chars[i - self._char0]

    def _payload(self, out: Path) -> dict[str, Any]:
        return {"byte_fallback": self.byte_fallback, "chars": "".join(self.chars)}

    def _model_bytes(self) -> bytes:
        return json.dumps([self.byte_fallback, self.chars]).encode()


# Training -----------------------------------------------------------------------------------


def _training_lines(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None,
    texts: Iterable[str] | None,
    pattern: str,
) -> list[str]:
    if (inputs is None) == (texts is None):
        raise ValueError("train_tokenizer needs exactly one of `inputs` (paths) or `texts`.")
    if texts is None:
        file_texts, _ = corpus.read_texts(
            [inputs] if isinstance(inputs, str | os.PathLike) else inputs, pattern, "--input"
        )
        texts = (t for _, t in file_texts)
    # SentencePiece trains on sentences; every non-blank line of the corpus is one.
    lines = [line for t in texts for line in corpus.split_documents(t, "line")]
    if not lines:
        raise ValueError(
            "train_tokenizer: the corpus has no non-blank lines; give it UTF-8 text to learn "
            "a vocabulary from."
        )
    return lines


class LongLinesWarning(UserWarning):
    """Lines longer than SentencePiece's sentence limit were cut for tokenizer training."""


# SentencePiece silently drops training sentences longer than this many bytes (its
# `max_sentence_length`); a corpus without newlines would leave it nothing to learn from.
MAX_SENTENCE_BYTES = 1 << 16


def _cut_long_line(line: str, limit: int) -> list[str]:
    """`line` cut into pieces of at most `limit` UTF-8 bytes, at spaces where possible."""
    pieces = []
    while len(line.encode("utf-8")) > limit:
        # Characters take at most 4 bytes: limit // 4 characters always fit.
        head = line[: limit // 4]
        cut = head.rfind(" ") + 1 or len(head)
        pieces.append(line[:cut])
        line = line[cut:]
    return [*pieces, line] if line else pieces


def _fit_sentences(lines: list[str], limit: int = MAX_SENTENCE_BYTES) -> list[str]:
    long = sum(1 for line in lines if len(line) * 4 > limit and len(line.encode()) > limit)
    if not long:
        return lines
    warnings.warn(
        f"{long} line(s) are longer than SentencePiece's {limit // 1024} KiB sentence limit; "
        "they were cut at spaces into shorter pieces for tokenizer training (the corpus "
        "itself is unchanged).",
        LongLinesWarning,
        stacklevel=3,
    )
    return [piece for line in lines for piece in _cut_long_line(line, limit)]


def _sample(lines: list[str], max_sentences: int, seed: int) -> list[str]:
    if len(lines) <= max_sentences:
        return lines
    # Our own seeded sample: SentencePiece's internal sampler is not seedable per call.
    keep = np.sort(np.random.default_rng(seed).choice(len(lines), max_sentences, replace=False))
    return [lines[i] for i in keep]


def train_tokenizer(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    texts: Iterable[str] | None = None,
    model_type: str = "unigram",
    vocab_size: int | None = 8000,
    character_coverage: float | None = None,
    byte_fallback: bool = True,
    num_sentinels: int = 0,
    max_sentences: int = 1_000_000,
    file_pattern: str = "*",
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
) -> Tokenizer:
    """Train a tokenizer in-process on text files / folders (`inputs`) or strings (`texts`).

    Args:
        model_type: "unigram" or "bpe" (SentencePiece), or "char".
        vocab_size: total V including the named specials, byte pieces and sentinels. For
            "char" it is an upper bound (the most frequent characters are kept) or None.
        character_coverage: fraction of character occurrences the vocabulary must cover;
            the rest go through byte fallback. Default 0.9995 (SentencePiece), 1.0 (char).
        byte_fallback: unknown characters become UTF-8 byte ids instead of <unk>.
        num_sentinels: T5 sentinels appended at the end of the vocabulary (0..100; T5's
            span corruption uses 100).
        max_sentences: at most this many lines (a seeded sample) are used for training.
        out_dir: if given, the tokenizer is also saved there.

    Returns:
        The trained tokenizer (round-trips text exactly when byte_fallback is on).
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not one of {list(MODEL_TYPES)}.")
    if not 0 <= num_sentinels <= MAX_SENTINELS:
        raise ValueError(f"num_sentinels={num_sentinels} must be in [0, {MAX_SENTINELS}].")
    lines = _sample(_training_lines(inputs, texts, file_pattern), max_sentences, seed)
    if model_type == "char":
        tok: Tokenizer = _train_char(
            lines,
            vocab_size,
            1.0 if character_coverage is None else character_coverage,
            byte_fallback,
            num_sentinels,
        )
    else:
        tok = _train_sentencepiece(
            _fit_sentences(lines),
            model_type,
            vocab_size,
            0.9995 if character_coverage is None else character_coverage,
            byte_fallback,
            num_sentinels,
        )
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def _train_char(
    lines: list[str],
    vocab_size: int | None,
    coverage: float,
    byte_fallback: bool,
    num_sentinels: int,
) -> CharTokenizer:
    counts = collections.Counter()
    for line in lines:
        counts.update(line)
    # Newlines separate the training lines, so they are not counted, yet every multi-line
    # document needs them: give "\n" a character id of its own.
    counts["\n"] = max(counts.get("\n", 0), 1)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(counts.values())
    fixed = len(SPECIAL_NAMES) + (256 if byte_fallback else 0) + num_sentinels
    limit = len(ranked) if vocab_size is None else vocab_size - fixed
    if limit < 1:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for characters after {fixed} special, "
            f"byte and sentinel ids; use vocab_size > {fixed} (or None for all characters)."
        )
    keep, covered = [], 0
    for ch, n in ranked[:limit]:
        if covered >= coverage * total:
            break
        keep.append(ch)
        covered += n
    return CharTokenizer(sorted(keep), byte_fallback=byte_fallback, num_sentinels=num_sentinels)


def _train_sentencepiece(
    lines: list[str],
    model_type: str,
    vocab_size: int | None,
    coverage: float,
    byte_fallback: bool,
    num_sentinels: int,
) -> SentencePieceTokenizer:
    if vocab_size is None:
        raise ValueError("SentencePiece needs a vocab_size (e.g. 8000).")
    pieces = vocab_size - num_sentinels
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            model_type=model_type,
            vocab_size=pieces,
            character_coverage=coverage,
            byte_fallback=byte_fallback,
            # Exact round trip: no NFKC, keep every space.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=SPECIAL_PIECES["pad"],
            unk_piece=SPECIAL_PIECES["unk"],
            bos_piece=SPECIAL_PIECES["bos"],
            eos_piece=SPECIAL_PIECES["eos"],
            # Control symbols (unlike user-defined ones) never match text, so a literal
            # "<mask>" in the corpus stays text and cannot inject a special token.
            control_symbols=[SPECIAL_PIECES[n] for n in ("cls", "sep", "mask")],
            input_sentence_size=0,  # we already sampled `max_sentences` lines, seeded.
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(_training_failure(str(e), model_type, vocab_size, num_sentinels)) from e
    return SentencePieceTokenizer(
        model.getvalue(),
        model_type=model_type,
        special_ids={n: i for i, n in enumerate(SPECIAL_NAMES)},
        num_sentinels=num_sentinels,
    )


def _training_failure(reason: str, model_type: str, vocab_size: int, num_sentinels: int) -> str:
    """SentencePiece's error restated in the caller's `vocab_size` terms.

    SentencePiece is asked for `vocab_size - num_sentinels` pieces, so the limit it quotes
    ("Please set it to a value <= N") is short by the sentinels appended afterwards.
    """
    too_high = re.search(
        r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", reason
    )
    if too_high:
        most = int(too_high.group(2)) + num_sentinels
        return (
            f"the text is too small for a {model_type} vocabulary of vocab_size={vocab_size}: "
            f"use vocab_size <= {most} (that counts the named specials, byte pieces"
            f"{f' and {num_sentinels} sentinels' if num_sentinels else ''}), or give more text."
        )
    short = reason.split("] ")[-1].rstrip(".")
    return (
        f"SentencePiece could not train a {model_type} vocabulary of vocab_size={vocab_size} "
        f"({num_sentinels} of them sentinels): {short}. Change vocab_size (or give more text)."
    )


# Loading ------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike, num_sentinels: int | None = None) -> Tokenizer:
    """Load a tokenizer saved by `Tokenizer.save` (a folder or its tokenizer.json), or a bare
    SentencePiece `.model` file (special ids read from the model; give `num_sentinels`,
    e.g. 100 for T5's spiece.model, to append T5 sentinels)."""
    p = Path(path)
    if p.is_file() and p.name == _META:
        p = p.parent
    if p.is_dir():
        meta_file = p / _META
        if not meta_file.is_file():
            raise ValueError(
                f"{str(p)!r} has no {_META}; give a folder written by Tokenizer.save / "
                "`llm-jax tokenizer train --out`, or a SentencePiece .model file."
            )
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{meta_file}: unsupported format_version {meta.get('format_version')}."
            )
        if meta["model_type"] == "char":
            tok: Tokenizer = CharTokenizer(
                list(meta["chars"]),
                byte_fallback=meta["byte_fallback"],
                num_sentinels=meta["num_sentinels"],
            )
        else:
            tok = SentencePieceTokenizer(
                (p / meta["model_file"]).read_bytes(),
                model_type=meta["model_type"],
                special_ids={k: int(v) for k, v in meta["special_ids"].items()},
                num_sentinels=meta["num_sentinels"],
            )
        if tok.vocab_size != meta["vocab_size"] or tok.special_ids != meta["special_ids"]:
            raise ValueError(f"{meta_file} does not match the model beside it (vocab/special ids).")
        return tok
    if p.is_file():
        return SentencePieceTokenizer(p.read_bytes(), num_sentinels=num_sentinels or 0)
    raise ValueError(f"no tokenizer at {str(p)!r}; train one with `llm-jax tokenizer train`.")
