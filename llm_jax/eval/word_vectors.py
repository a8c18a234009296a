"""Word vectors: the word2vec text/binary formats, neighbours, analogies, WordSim and analogy
benchmarks. NumPy only, so gensim's vectors and ours go through the very same evaluation.

Shape letters: V vocabulary, D vector dim, Q questions.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_EPS_3COSMUL = 1e-3  # Levy & Goldberg 2014's epsilon, as in gensim's most_similar_cosmul.


@dataclasses.dataclass(frozen=True, eq=False)
class WordVectors:
    """Words and their vectors [V, D] (float32), most frequent word first."""

    words: tuple[str, ...]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or self.vectors.shape[0] != len(self.words):
            raise ValueError(f"vectors {self.vectors.shape} must be [{len(self.words)}, D].")
        index: dict[str, int] = {}
        folded: dict[str, int] = {}
        for i, w in enumerate(self.words):
            index.setdefault(w, i)
            folded.setdefault(w.lower(), i)  # the most frequent spelling wins, as in gensim
        norms = np.linalg.norm(self.vectors, axis=1, keepdims=True)
        object.__setattr__(self, "index", index)
        object.__setattr__(self, "folded", folded)
        object.__setattr__(self, "unit", self.vectors / np.maximum(norms, 1e-12))

    def lookup(self, word: str, *, case_insensitive: bool = False) -> int | None:
        """The row of `word`, or None when it is out of the vocabulary."""
        if case_insensitive:
            return self.folded.get(word.lower())
        return self.index.get(word)

    def missing(self, words: Sequence[str]) -> list[str]:
        return [w for w in words if w not in self.index]

    def nearest(
        self, positive: Sequence[str], negative: Sequence[str] = (), topn: int = 10
    ) -> list[tuple[str, float]]:
        """The `topn` words closest (cosine) to Σ positive - Σ negative, the query words left
        out. `nearest(["king", "woman"], ["man"])` is the analogy man : king :: woman : ?

        Raises:
          KeyError: naming the query words that are not in the vocabulary.
        """
        absent = self.missing([*positive, *negative])
        if absent:
            raise KeyError(f"not in the vocabulary ({len(self.words)} words): {absent}")
        query = sum(self.unit[self.index[w]] for w in positive) - sum(
            (self.unit[self.index[w]] for w in negative), np.zeros(self.unit.shape[1])
        )
        sims = self.unit @ (query / max(np.linalg.norm(query), 1e-12))
        sims[[self.index[w] for w in (*positive, *negative)]] = -np.inf
        top = np.argsort(-sims)[:topn]
        return [(self.words[i], float(sims[i])) for i in top]


# ------------------------------------------------------------------------------- file formats


def save_word2vec(wv: WordVectors, path: str | os.PathLike, *, binary: bool) -> Path:
    """Write the word2vec format: a "V D" header line, then per word the word, a space and
    the vector, as text ("%.6f" numbers) or as D little-endian float32 and a newline."""
    path = Path(path)
    vecs = np.ascontiguousarray(wv.vectors, dtype="<f4")
    with open(path, "wb") as f:
        f.write(f"{vecs.shape[0]} {vecs.shape[1]}\n".encode())
        for word, row in zip(wv.words, vecs, strict=True):
            if binary:
                f.write(word.encode() + b" " + row.tobytes() + b"\n")
            else:
                f.write((word + " " + " ".join(f"{x:.6f}" for x in row) + "\n").encode())
    return path


def load_word2vec(path: str | os.PathLike, *, binary: bool | None = None) -> WordVectors:
    """Read the word2vec text or binary format (`binary=None`: guess from the suffix .bin)."""
    path = Path(path)
    if binary is None:
        binary = path.suffix == ".bin"
    with open(path, "rb") as f:
        header = f.readline().split()
        if len(header) != 2 or not all(h.isdigit() for h in header):
            raise ValueError(f"{path}:1: expected the header 'V D'; got {header!r}.")
        v, d = int(header[0]), int(header[1])
        words, rows = [], np.empty((v, d), np.float32)
        for i in range(v):
            if binary:
                word = b""
                while (c := f.read(1)) != b" ":
                    if not c:
                        raise ValueError(f"{path}: ends after {i} of {v} vectors.")
                    word += c
                rows[i] = np.frombuffer(f.read(4 * d), "<f4")
                words.append(word.decode().lstrip("\n"))
            else:
                parts = f.readline().decode().rstrip("\n").split(" ")
                if len(parts) != d + 1:
                    raise ValueError(f"{path}:{i + 2}: expected a word and {d} numbers.")
                words.append(parts[0])
                rows[i] = np.asarray(parts[1:], np.float32)
    return WordVectors(tuple(words), rows)


# -------------------------------------------------------------------------------- benchmarks


def read_wordsim(path: str | os.PathLike) -> list[tuple[str, str, float]]:
    """WordSim-353 style "word1<TAB>word2<TAB>score" lines; '#' starts a comment line."""
    pairs = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        try:
            pairs.append((parts[0], parts[1], float(parts[2])))
        except (IndexError, ValueError):
            raise ValueError(
                f"{path}:{n}: expected 'word1<TAB>word2<TAB>score'; got {line!r}."
            ) from None
    return pairs


def read_analogies(path: str | os.PathLike) -> list[tuple[str, list[tuple[str, ...]]]]:
    """Google analogy file: ": section" lines, then "a b c d" questions (a : b :: c : d)."""
    sections: list[tuple[str, list[tuple[str, ...]]]] = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith(":"):
            sections.append((line[1:].strip(), []))
            continue
        words = tuple(line.split())
        if len(words) != 4 or not sections:
            what = "four words" if sections else "a ': section' line first"
            raise ValueError(f"{path}:{n}: expected {what}; got {line!r}.")
        sections[-1][1].append(words)
    return sections


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's r of the (tie-averaged) ranks."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def wordsim(
    wv: WordVectors, path: str | os.PathLike, *, case_insensitive: bool = True
) -> dict[str, float]:
    """Spearman's rho between human scores and cosine similarity, over the pairs whose two
    words are in the vocabulary; `oov` is the share of pairs left out."""
    pairs = read_wordsim(path)
    human, model = [], []
    for w1, w2, score in pairs:
        i, j = (
            wv.lookup(w1, case_insensitive=case_insensitive),
            wv.lookup(w2, case_insensitive=case_insensitive),
        )
        if i is not None and j is not None:
            human.append(score)
            model.append(float(wv.unit[i] @ wv.unit[j]))
    rho = spearman(human, model) if len(human) > 1 else math.nan
    return {"spearman": rho, "pairs": len(pairs), "oov": 1.0 - len(human) / max(len(pairs), 1)}


def _answer(unit: np.ndarray, q: np.ndarray, method: str) -> np.ndarray:
    """Best row index for each question [Q, 4] ids (a, b, c, d) by 3CosAdd or 3CosMul."""
    a, b, c = unit[q[:, 0]], unit[q[:, 1]], unit[q[:, 2]]
    if method == "3cosadd":
        scores = (b - a + c) @ unit.T  # [Q, V]; ranking is unchanged by the query's norm
    else:
        sa, sb, sc = ((x @ unit.T + 1.0) / 2.0 for x in (a, b, c))
        scores = sb * sc / (sa + _EPS_3COSMUL)
    rows = np.arange(len(q))[:, None]
    scores[rows, q[:, :3]] = -np.inf  # the question's own words are never the answer
    return np.argmax(scores, axis=1)


def analogies(
    wv: WordVectors,
    path: str | os.PathLike,
    *,
    restrict_vocab: int = 300_000,
    case_insensitive: bool = True,
    chunk: int = 512,
) -> dict[str, dict[str, float]]:
    """3CosAdd and 3CosMul accuracy per section and overall ("total") over the questions
    whose four words are among the `restrict_vocab` most frequent (gensim's convention);
    each entry also reports `questions` and the `oov` share left out."""
    limit = min(restrict_vocab, len(wv.words))
    unit = wv.unit[:limit]
    results: dict[str, dict[str, float]] = {}
    totals = {"3cosadd": 0, "3cosmul": 0, "seen": 0, "questions": 0}
    for name, questions in read_analogies(path):
        ids = [[wv.lookup(w, case_insensitive=case_insensitive) for w in q] for q in questions]
        q = np.asarray([r for r in ids if all(i is not None and i < limit for i in r)], np.int64)
        q = q.reshape(-1, 4)
        correct = {"3cosadd": 0, "3cosmul": 0}
        for s in range(0, len(q), chunk):
            for method in correct:
                correct[method] += int(
                    np.sum(_answer(unit, q[s : s + chunk], method) == q[s : s + chunk, 3])
                )
        seen = len(q)
        results[name] = {
            **{m: c / seen if seen else math.nan for m, c in correct.items()},
            "questions": len(questions),
            "oov": 1.0 - seen / max(len(questions), 1),
        }
        for m in correct:
            totals[m] += correct[m]
        totals["seen"] += seen
        totals["questions"] += len(questions)
    seen = totals["seen"]
    results["total"] = {
        "3cosadd": totals["3cosadd"] / seen if seen else math.nan,
        "3cosmul": totals["3cosmul"] / seen if seen else math.nan,
        "questions": totals["questions"],
        "oov": 1.0 - seen / max(totals["questions"], 1),
    }
    return results
