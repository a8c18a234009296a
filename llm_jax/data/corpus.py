"""Reading a corpus from disk: files and folders, UTF-8 with replacement, document splits,
TSV columns and fastText label lines; tokenizing it into ragged id arrays; caching those.

Everything here runs before any device work, so a missing path, an empty corpus or a bad
TSV row surfaces as a ValueError that says what to change.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llm_jax.data.tokenizer import Tokenizer

_CACHE_VERSION = 1
_REPLACEMENT = "\ufffd"
_REPLACEMENT_BYTES = _REPLACEMENT.encode("utf-8")


class InvalidUTF8Warning(UserWarning):
    """Some corpus bytes were not valid UTF-8 and were replaced by U+FFFD."""


# Files ---------------------------------------------------------------------------------------


def list_files(
    paths: Sequence[str | os.PathLike], pattern: str = "*", what: str = "DataConfig.paths"
) -> list[Path]:
    """The files named by `paths`, folders walked recursively in sorted order.

    Hidden files and folders (a name starting with '.') are skipped; inside folders only
    names matching the fnmatch `pattern` are kept. `what` names the setting in errors.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise ValueError(f"{what} is empty; give at least one UTF-8 text file or folder.")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and fnmatch.fnmatch(f.name, pattern)
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise ValueError(
                    f"{what}: folder {str(p)!r} has no files matching {pattern!r}; add text "
                    "files to it or change the path / DataConfig.file_pattern."
                )
            files.extend(found)
        else:
            raise ValueError(
                f"{what}: no such file or folder: {str(p)!r}; fix the path (relative paths "
                f"are read from {os.getcwd()!r})."
            )
    return files


def read_text(path: str | os.PathLike) -> tuple[str, int]:
    """The file decoded as UTF-8, invalid byte sequences replaced by U+FFFD.

    Returns:
        (text, number of invalid byte sequences that were replaced).
    """
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8", errors="replace")
    # Each invalid sequence becomes one U+FFFD; genuine U+FFFD in the file are not errors.
    return text, text.count(_REPLACEMENT) - raw.count(_REPLACEMENT_BYTES)


def warn_invalid_utf8(counts: dict[str, int]) -> None:
    """One warning summarising the invalid UTF-8 found per file (nothing if none)."""
    bad = {k: v for k, v in counts.items() if v}
    if not bad:
        return
    listing = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    warnings.warn(
        f"replaced {sum(bad.values())} invalid UTF-8 byte sequence(s) with U+FFFD in "
        f"{len(bad)} file(s): {listing}{more}",
        InvalidUTF8Warning,
        stacklevel=3,
    )


def read_texts(
    paths: Sequence[str | os.PathLike], pattern: str = "*", what: str = "DataConfig.paths"
) -> tuple[list[tuple[Path, str]], dict[str, int]]:
    """(path, text) for every file, plus the invalid-UTF-8 count per file (warned once)."""
    out, counts = [], {}
    for f in list_files(paths, pattern, what):
        text, bad = read_text(f)
        out.append((f, text))
        counts[str(f)] = bad
    warn_invalid_utf8(counts)
    return out, counts


def _lines(text: str) -> list[str]:
    # Only "\n" separates lines: str.splitlines would also split on \x0b, \x1c, U+2028, ...
    # which are ordinary characters of some corpora.
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def split_documents(text: str, doc_split: str) -> list[str]:
    """Documents of one file: the whole "file", each "line", or each "blank_line" paragraph.

    Blank (whitespace-only) documents are dropped; kept documents are returned verbatim
    (paragraphs keep their inner newlines) so tokenization round-trips the text exactly.
    """
    if doc_split == "file":
        return [text] if text.strip() else []
    lines = _lines(text)
    if doc_split == "line":
        return [line for line in lines if line.strip()]
    if doc_split == "blank_line":
        docs, current = [], []
        for line in [*lines, ""]:
            if line.strip():
                current.append(line)
            elif current:
                docs.append("\n".join(current))
                current = []
        return docs
    raise ValueError(f"doc_split={doc_split!r} is not one of ['file', 'line', 'blank_line'].")


def _empty_error(what: str, paths: Sequence[Any], unit: str) -> ValueError:
    return ValueError(
        f"{what} holds no text: {[str(p) for p in paths]} gave 0 {unit} (the files are empty "
        "or whitespace only); point it at non-empty UTF-8 text."
    )


def read_documents(
    paths: Sequence[str | os.PathLike],
    doc_split: str = "file",
    pattern: str = "*",
    what: str = "DataConfig.paths",
) -> tuple[list[str], dict[str, int]]:
    """All documents of the corpus in file order, and the invalid-UTF-8 count per file."""
    texts, counts = read_texts(paths, pattern, what)
    docs = [d for _, text in texts for d in split_documents(text, doc_split)]
    if not docs:
        raise _empty_error(what, paths, "documents")
    return docs, counts


def read_sentence_groups(
    paths: Sequence[str | os.PathLike],
    doc_split: str = "file",
    pattern: str = "*",
    what: str = "DataConfig.paths",
) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Sentences (non-blank lines) and the document each belongs to, for NSP / SOP.

    A document is a blank-line paragraph for doc_split="blank_line" and a whole file
    otherwise (with "line", consecutive lines of a file are the sentence sequence).

    Returns:
        (sentences, group id per sentence int64 [n], invalid-UTF-8 count per file).
    """
    texts, counts = read_texts(paths, pattern, what)
    sentences: list[str] = []
    groups: list[int] = []
    group = 0
    unit = "blank_line" if doc_split == "blank_line" else "file"
    for _, text in texts:
        for doc in split_documents(text, unit):
            lines = [line for line in _lines(doc) if line.strip()]
            sentences.extend(lines)
            groups.extend([group] * len(lines))
            group += 1
    if not sentences:
        raise _empty_error(what, paths, "sentences")
    return sentences, np.asarray(groups, np.int64), counts


def read_tsv_columns(
    paths: Sequence[str | os.PathLike],
    columns: Sequence[int],
    pattern: str = "*",
    what: str = "DataConfig.paths",
) -> tuple[list[list[str]], dict[str, int]]:
    """The given 0-based columns of every non-blank TSV row (tabs split, no quoting).

    Returns:
        (one list of cells per requested column, invalid-UTF-8 count per file).
    """
    texts, counts = read_texts(paths, pattern, what)
    out: list[list[str]] = [[] for _ in columns]
    need = max(columns) + 1
    for path, text in texts:
        for lineno, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) < need:
                raise ValueError(
                    f"{path}:{lineno} has {len(cells)} tab-separated column(s) but column "
                    f"{need - 1} (0-based) is configured; fix the row or the DataConfig "
                    "column settings."
                )
            for col, cell in zip(out, columns, strict=True):
                col.append(cells[cell])
    if not out[0]:
        raise _empty_error(what, paths, "rows")
    return out, counts


def read_fasttext(
    paths: Sequence[str | os.PathLike], pattern: str = "*", what: str = "DataConfig.paths"
) -> tuple[list[str], list[str], dict[str, int]]:
    """fastText-style lines `__label__NAME text` → (label names, texts, invalid-UTF-8 counts)."""
    texts, counts = read_texts(paths, pattern, what)
    labels, out = [], []
    for path, text in texts:
        for lineno, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            head, _, rest = line.partition(" ")
            if not head.startswith("__label__") or len(head) == len("__label__"):
                raise ValueError(
                    f"{path}:{lineno} does not start with '__label__NAME '; fastText format "
                    "needs one labelled text per line (or use format='tsv')."
                )
            labels.append(head[len("__label__") :])
            out.append(rest)
    if not out:
        raise _empty_error(what, paths, "labelled lines")
    return labels, out, counts


# Token ids -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Token ids of n texts in one flat array: text i is `tokens[offsets[i]:offsets[i+1]]`.

    Attributes:
        tokens: int32 [N], all ids back to back.
        offsets: int64 [n + 1], offsets[0] = 0 and offsets[-1] = N.
    """

    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 [n], tokens per text."""
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


def encode_ragged(tokenizer: Tokenizer, texts: Sequence[str]) -> Ragged:
    """Encode many texts into one Ragged (uses the tokenizer's batch encoder)."""
    ids = tokenizer.encode_batch(list(texts))
    lengths = np.fromiter((len(x) for x in ids), np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((t for x in ids for t in x), np.int32, count=int(offsets[-1]))
    return Ragged(tokens, offsets)


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """What the pipeline needs from a corpus after tokenization.

    Attributes:
        fields: named Ragged id arrays (e.g. "docs", or "source" and "target").
        arrays: named per-text arrays (e.g. NSP sentence groups, class label codes).
        meta: JSON-able facts (invalid UTF-8 counts per file, label names, ...).
    """

    fields: dict[str, Ragged]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def default_cache_dir() -> Path:
    """$LLM_JAX_CACHE, else $XDG_CACHE_HOME/llm_jax, else ~/.cache/llm_jax."""
    if os.environ.get("LLM_JAX_CACHE"):
        return Path(os.environ["LLM_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm_jax"


def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(files: Iterable[Path], tokenizer: Tokenizer, params: dict[str, Any]) -> str:
    """Hash of the corpus bytes (in order), the tokenizer and the reading parameters.

    Content, not paths or mtimes, is hashed, so a touched-but-unchanged file still hits and
    an edited file always misses.
    """
    h = hashlib.sha256()
    h.update(json.dumps({"v": _CACHE_VERSION, **params}, sort_keys=True).encode())
    h.update(tokenizer.fingerprint.encode())
    for f in files:
        h.update(file_digest(f).encode())
    return h.hexdigest()[:32]


def _save(corpus: TokenizedCorpus, folder: Path) -> None:
    for name, r in corpus.fields.items():
        np.save(folder / f"{name}.tokens.npy", r.tokens)
        np.save(folder / f"{name}.offsets.npy", r.offsets)
    for name, a in corpus.arrays.items():
        np.save(folder / f"{name}.array.npy", a)
    meta = {**corpus.meta, "_fields": list(corpus.fields), "_arrays": list(corpus.arrays)}
    (folder / "meta.json").write_text(json.dumps(meta))


def _load(folder: Path) -> TokenizedCorpus:
    meta = json.loads((folder / "meta.json").read_text())
    # Memory-mapped: batches read only the rows they gather, however large the corpus.
    fields = {
        n: Ragged(
            np.load(folder / f"{n}.tokens.npy", mmap_mode="r"),
            np.load(folder / f"{n}.offsets.npy"),
        )
        for n in meta.pop("_fields")
    }
    arrays = {n: np.load(folder / f"{n}.array.npy") for n in meta.pop("_arrays")}
    return TokenizedCorpus(fields, arrays, meta)


def cached_tokenize(
    files: list[Path],
    tokenizer: Tokenizer,
    params: dict[str, Any],
    build: Callable[[], TokenizedCorpus],
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TokenizedCorpus:
    """`build()` once per (corpus content, tokenizer, params); later calls load the .npy files.

    A cache hit repeats the invalid-UTF-8 warning recorded at build time, so behaviour does
    not depend on whether the cache was warm. Writes go to a temporary folder renamed into
    place, so concurrent hosts never read a half-written entry.
    """
    if not use_cache:
        return build()
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / "tokens" / cache_key(files, tokenizer, params)
    if (folder / "meta.json").is_file():
        corpus = _load(folder)
        warn_invalid_utf8(corpus.meta.get("invalid_utf8", {}))
        return corpus
    corpus = build()
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        _save(corpus, tmp)
        os.replace(tmp, folder)
    except OSError:
        # Another process won the race (the target exists): its entry is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():
            raise
    return _load(folder)
