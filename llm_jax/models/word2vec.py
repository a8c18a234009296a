"""Word2Vec (Mikolov et al. 2013): skip-gram and CBOW with negative sampling or hierarchical
softmax, trained by batched, jitted sparse-row SGD.

The data side is NumPy: vocabulary (min_count, most frequent first), Huffman tree, the
unigram^0.75 noise distribution, frequent-word subsampling, dynamic windows and the pairs of
one chunk of the corpus, all vectorised. The update is one jitted function: gather the input
rows and the output rows (true word + negatives, or the Huffman path), take the gradient of
`ops.negative_sampling_loss` / `ops.hierarchical_softmax_loss` with respect to those rows,
and scatter-add -lr * gradient back.

Why plain SGD on sparse rows rather than optax: a step touches a few thousand of the V rows.
An optax transformation maps dense gradients of the whole tables (V x D, twice) every step,
which would cost more than the update itself, and word2vec's published recipe *is* plain SGD
with a learning rate decayed linearly to a floor; there is no optimizer state to keep.

Defaults follow the original tool and gensim 4 (they agree): dim 100, window 5, negative 5,
ns_exponent 0.75, min_count 5, sample 1e-3, epochs 5, alpha 0.025 -> min_alpha 1e-4.

Shape letters: V vocabulary, D dim, P examples per step, C context slots (1 for skip-gram,
2 * window for CBOW), K output rows per example (1 + negative, or the longest Huffman path).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import ops
from llm_jax.config import Config, at_least, in_interval, one_of
from llm_jax.eval.word_vectors import WordVectors, save_word2vec


@dataclasses.dataclass(frozen=True, kw_only=True)
class Word2VecConfig(Config):
    """Hyperparameters; the defaults are word2vec.c's and gensim 4's."""

    section: ClassVar[str] = "word2vec"

    model: str = "sg"  # sg | cbow
    loss: str = "ns"  # ns (negative sampling) | hs (hierarchical softmax)
    dim: int = 100
    window: int = 5  # the largest window; each centre word draws one in [1, window]
    negative: int = 5  # noise words per example (ns)
    ns_exponent: float = 0.75  # noise distribution ∝ count^ns_exponent
    min_count: int = 5
    sample: float = 1e-3  # subsampling threshold t; 0 turns subsampling off
    epochs: int = 5
    alpha: float = 0.025
    min_alpha: float = 1e-4
    batch: int = 512  # examples (pairs for sg, centre words for cbow) per SGD update
    steps_per_call: int = 32  # updates per call of the jitted function (a lax.scan)
    chunk_words: int = 200_000  # corpus positions whose examples are built at once
    max_sentence_length: int = 10_000  # gensim's LineSentence splits longer lines
    seed: int = 1

    def __post_init__(self) -> None:
        one_of(self, "model", ("sg", "cbow"))
        one_of(self, "loss", ("ns", "hs"))
        for name in ("dim", "window", "min_count", "epochs", "batch", "steps_per_call"):
            at_least(self, name, 1)
        at_least(self, "negative", 1 if self.loss == "ns" else 0)
        at_least(self, "max_sentence_length", 2)
        at_least(self, "chunk_words", 1)
        in_interval(self, "ns_exponent", -1.0, 1.0)
        at_least(self, "sample", 0.0)
        at_least(self, "alpha", 0.0, strict=True)
        in_interval(self, "min_alpha", 0.0, self.alpha)


# ------------------------------------------------------------------------------- vocabulary


@dataclasses.dataclass(frozen=True, eq=False)
class Vocab:
    """Words kept by min_count, most frequent first (ties: first seen first), and counts."""

    words: tuple[str, ...]
    counts: np.ndarray  # [V] int64

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)


def read_sentences(paths: Sequence[str | os.PathLike], max_length: int) -> Iterator[list[str]]:
    """Whitespace-split lines of the files, lines longer than `max_length` cut into pieces."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = line.split()
                for s in range(0, len(words), max_length):
                    yield words[s : s + max_length]


def build_vocab(counts: Counter, min_count: int) -> Vocab:
    """Keep the words seen at least `min_count` times, sorted by count (stable).

    Raises:
      ValueError: when fewer than two words survive (the count of survivors is given).
    """
    kept = [(w, c) for w, c in counts.items() if c >= min_count]
    if len(kept) < 2:
        raise ValueError(
            f"only {len(kept)} of the corpus's {len(counts)} distinct words occur at least "
            f"min_count={min_count} times; word2vec needs at least 2. Lower --min-count or "
            f"give a larger corpus."
        )
    kept.sort(key=lambda wc: -wc[1])  # stable: ties keep first-seen order, as gensim
    return Vocab(tuple(w for w, _ in kept), np.asarray([c for _, c in kept], np.int64))


def encode_corpus(sentences: Sequence[list[str]], vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    """Word ids [N] (out-of-vocabulary words dropped, as the original) and sentence ids [N]."""
    index = vocab.index
    ids, sent = [], []
    for s, words in enumerate(sentences):
        row = [index[w] for w in words if w in index]
        ids.extend(row)
        sent.extend([s] * len(row))
    return np.asarray(ids, np.int32), np.asarray(sent, np.int32)


def keep_probability(counts: np.ndarray, sample: float) -> np.ndarray:
    """Mikolov's subsampling as in word2vec.c and gensim: with z = count / total,
    P(keep) = (sqrt(z / t) + 1) * t / z, capped at 1; t = 0 keeps everything."""
    counts = np.asarray(counts, np.float64)
    if sample <= 0:
        return np.ones_like(counts)
    threshold = sample * counts.sum()
    return np.minimum((np.sqrt(counts / threshold) + 1.0) * threshold / counts, 1.0)


def noise_cdf(counts: np.ndarray, exponent: float = 0.75) -> np.ndarray:
    """Cumulative noise distribution ∝ count^exponent, [V], last entry 1."""
    p = np.asarray(counts, np.float64) ** exponent
    cdf = np.cumsum(p / p.sum())
    cdf[-1] = 1.0
    return cdf


def noise_table(cdf: np.ndarray, size: int | None = None) -> np.ndarray:
    """word2vec.c's unigram table: `size` word ids, word i filling a share cdf[i] - cdf[i-1]
    of it, so that a uniform index draws a noise word in O(1) (a binary search over the
    cdf per draw made example building 20x slower). Default size: 100 slots per word,
    between 10^6 and 10^8 (word2vec.c's)."""
    if size is None:
        size = int(min(max(100 * len(cdf), 10**6), 10**8))
    return np.searchsorted(cdf, (np.arange(size) + 0.5) / size, side="right").astype(np.int32)


def huffman(counts: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Huffman codes and inner-node paths, word2vec.c's CreateBinaryTree step by step.

    `counts` must be sorted in decreasing order. Of the two nodes merged, the second
    smallest gets bit 1. Inner nodes are numbered 0..V-2 in merge order, so the root is V-2.

    Returns:
      (codes, points): per word its bits and the inner nodes on its path, both root first.
    """
    v = len(counts)
    count = [*counts, *[1e15] * v]
    parent = [0] * (2 * v)
    binary = [0] * (2 * v)
    pos1, pos2 = v - 1, v

    def smallest() -> int:
        nonlocal pos1, pos2
        if pos1 >= 0 and count[pos1] < count[pos2]:
            pos1 -= 1
            return pos1 + 1
        pos2 += 1
        return pos2 - 1

    for a in range(v - 1):
        m1, m2 = smallest(), smallest()
        count[v + a] = count[m1] + count[m2]
        parent[m1] = parent[m2] = v + a
        binary[m2] = 1
    codes, points = [], []
    for a in range(v):
        code, point, b = [], [], a
        while b != 2 * v - 2:
            code.append(binary[b])
            b = parent[b]
            point.append(b - v)
        codes.append(code[::-1])
        points.append(point[::-1])
    return codes, points


def padded_tree(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`huffman` as arrays: codes [V, L] int32, points [V, L] int32, mask [V, L] float32."""
    codes, points = huffman(counts.tolist())
    depth = max(len(c) for c in codes)
    c = np.zeros((len(codes), depth), np.int32)
    p = np.zeros((len(codes), depth), np.int32)
    m = np.zeros((len(codes), depth), np.float32)
    for i, (ci, pi) in enumerate(zip(codes, points, strict=True)):
        c[i, : len(ci)], p[i, : len(pi)], m[i, : len(ci)] = ci, pi, 1.0
    return c, p, m


# ------------------------------------------------------------------------------------ pairs


def window_pairs(
    sent: np.ndarray, start: int, stop: int, reach: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """(centre, context) positions for the centres in [start, stop): every context within
    the centre's drawn reach (1..window) and in the same sentence. Ordered by offset."""
    centres, contexts = [], []
    n = len(sent)
    for o in (*range(-window, 0), *range(1, window + 1)):
        i = np.arange(max(start, -o), min(stop, n - o))
        j = i + o
        ok = (abs(o) <= reach[i - start]) & (sent[i] == sent[j])
        centres.append(i[ok])
        contexts.append(j[ok])
    return np.concatenate(centres), np.concatenate(contexts)


def cbow_contexts(
    sent: np.ndarray, start: int, stop: int, reach: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per centre in [start, stop): context positions [N, 2W] and mask [N, 2W] float32;
    centres without any context are dropped. Returns (centres, contexts, mask)."""
    n = len(sent)
    i = np.arange(start, stop)
    offsets = np.asarray([*range(-window, 0), *range(1, window + 1)])
    j = i[:, None] + offsets[None, :]
    inside = (j >= 0) & (j < n)
    jc = np.clip(j, 0, n - 1)
    ok = inside & (np.abs(offsets)[None, :] <= reach[:, None]) & (sent[jc] == sent[i][:, None])
    has = ok.any(axis=1)
    return i[has], jc[has], ok[has].astype(np.float32)


# ------------------------------------------------------------------------------- the update


def _update(w_in, w_out, inp, inp_mask, out, codes, out_mask, lr, *, loss: str):
    """One sparse SGD step. inp/inp_mask [P, C]; out/codes/out_mask [P, K]; lr scalar.

    h is the masked mean of the input rows (the row itself for skip-gram); each input row
    receives the full gradient of h, not 1/C of it, as word2vec.c and gensim's cbow_mean do.
    """
    rows_in = w_in[inp]  # [P, C, D]
    n_in = jnp.maximum(jnp.sum(inp_mask, axis=1, keepdims=True), 1.0)
    h = jnp.einsum("pcd,pc->pd", rows_in, inp_mask) / n_in
    rows_out = w_out[out]  # [P, K, D]

    def loss_fn(h, rows_out):
        if loss == "ns":
            total, count = ops.negative_sampling_loss(h, rows_out, out_mask)
        else:
            total, count = ops.hierarchical_softmax_loss(h, rows_out, codes, out_mask)
        return total, count

    (total, count), (g_h, g_out) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        h, rows_out
    )
    d_in = -lr * g_h[:, None, :] * inp_mask[..., None]  # [P, C, D]
    w_in = w_in.at[inp.reshape(-1)].add(d_in.reshape(-1, d_in.shape[-1]))
    w_out = w_out.at[out.reshape(-1)].add((-lr * g_out).reshape(-1, g_out.shape[-1]))
    return w_in, w_out, total, count


@dataclasses.dataclass(frozen=True, eq=False)
class Word2Vec:
    """A trained (or initialised) model: config, vocabulary, input and output tables."""

    config: Word2VecConfig
    vocab: Vocab
    w_in: np.ndarray  # [V, D] the word vectors (syn0)
    w_out: np.ndarray  # [V, D] (ns: syn1neg) or [V - 1, D] (hs: syn1, one row per inner node)

    def word_vectors(self) -> WordVectors:
        return WordVectors(self.vocab.words, np.asarray(self.w_in, np.float32))

    def save(self, out_dir: str | os.PathLike) -> Path:
        """vectors.txt, vectors.bin (word2vec formats) and checkpoint/ (safetensors + JSON)."""
        out = Path(out_dir)
        (out / "checkpoint").mkdir(parents=True, exist_ok=True)
        wv = self.word_vectors()
        save_word2vec(wv, out / "vectors.txt", binary=False)
        save_word2vec(wv, out / "vectors.bin", binary=True)
        from safetensors.numpy import save_file

        save_file(
            {
                "w_in": np.asarray(self.w_in, np.float32),
                "w_out": np.asarray(self.w_out, np.float32),
            },
            str(out / "checkpoint" / "tables.safetensors"),
        )
        state = {
            "config": self.config.to_dict(),
            "words": list(self.vocab.words),
            "counts": self.vocab.counts.tolist(),
        }
        (out / "checkpoint" / "state.json").write_text(json.dumps(state))
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> Word2Vec:
        from safetensors.numpy import load_file

        ckpt = Path(out_dir) / "checkpoint"
        state = json.loads((ckpt / "state.json").read_text())
        tables = load_file(str(ckpt / "tables.safetensors"))
        vocab = Vocab(tuple(state["words"]), np.asarray(state["counts"], np.int64))
        cfg = Word2VecConfig.from_dict(state["config"])
        return cls(cfg, vocab, tables["w_in"], tables["w_out"])


# --------------------------------------------------------------------------------- training


@dataclasses.dataclass
class Progress:
    """What a progress callback sees every `log_every` calls and at the end of each epoch."""

    words_done: int  # raw corpus positions processed, all epochs
    words_total: int
    loss: float  # mean loss per example over the last call's updates
    lr: float  # the learning rate of the last update
    epoch: int  # 0-based


def _examples(cfg, ids, sent, rng, tree, table, start, stop, reach):
    """Arrays (inp, inp_mask, out, codes, out_mask) of one chunk, unpadded, example-major."""
    if cfg.model == "sg":
        c, x = window_pairs(sent, start, stop, reach, cfg.window)
        inp, inp_mask = ids[x][:, None], np.ones((len(x), 1), np.float32)
    else:
        c, ctx, inp_mask = cbow_contexts(sent, start, stop, reach, cfg.window)
        inp = ids[ctx]
    target = ids[c]
    if cfg.loss == "ns":
        neg = table[rng.integers(0, len(table), (len(c), cfg.negative))]
        out = np.concatenate([target[:, None], neg], axis=1)
        out_mask = np.concatenate(
            [np.ones((len(c), 1), np.float32), (neg != target[:, None]).astype(np.float32)], 1
        )
        codes = np.zeros_like(out)
    else:
        codes, points, mask = tree
        out, codes, out_mask = points[target], codes[target], mask[target]
    return inp.astype(np.int32), inp_mask, out, codes, out_mask


def _scan_updates(w_in, w_out, inp, inp_mask, out, codes, out_mask, lr, *, loss: str):
    """M sequential `_update`s in one call: arrays [M, P, ...], lr [M]. Small updates in a
    scan keep the gathered rows in cache; one dispatch per M of them hides the call cost
    (P=512, M=32 is 3x faster per example than one update of P=4096 on CPU)."""

    def body(tables, xs):
        *xs, lr_m = xs
        w_in, w_out, total, count = _update(*tables, *xs, lr_m, loss=loss)
        return (w_in, w_out), (total, count)

    (w_in, w_out), (total, count) = jax.lax.scan(
        body, (w_in, w_out), (inp, inp_mask, out, codes, out_mask, lr)
    )
    return w_in, w_out, jnp.sum(total), jnp.sum(count)


def _lr(cfg: Word2VecConfig, done: np.ndarray, total_words: int) -> np.ndarray:
    """Linear decay from alpha by raw words done, floored at min_alpha (word2vec.c)."""
    return np.maximum(cfg.alpha * (1.0 - done / (total_words + 1)), cfg.min_alpha)


def _calls(cfg: Word2VecConfig, arrays, raw_lo: float, raw_hi: float, total_words: int):
    """Split one chunk's examples into calls of [M, P, ...] (zero-padded, weight 0), each
    with its learning rates [M] and the raw word position it reaches."""
    n, per_call = len(arrays[0]), cfg.batch * cfg.steps_per_call
    calls = max(-(-n // per_call), 1)
    padded = [
        np.concatenate([a, np.zeros((calls * per_call - n, *a.shape[1:]), a.dtype)]).reshape(
            calls, cfg.steps_per_call, cfg.batch, *a.shape[1:]
        )
        for a in arrays
    ]
    starts = np.arange(calls * cfg.steps_per_call) * cfg.batch
    done = raw_lo + (raw_hi - raw_lo) * np.minimum(starts / max(n, 1), 1.0)
    lrs = _lr(cfg, done, total_words).astype(np.float32).reshape(calls, cfg.steps_per_call)
    for c in range(calls):
        yield [a[c] for a in padded], lrs[c], done[min((c + 1) * cfg.steps_per_call, len(done) - 1)]


def train(
    cfg: Word2VecConfig,
    paths: Sequence[str | os.PathLike],
    *,
    on_step: Callable[[Progress], None] | None = None,
    log_every: int = 5,
) -> Word2Vec:
    """Train on whitespace-tokenised text files (one sentence per line); `on_step` sees the
    progress every `log_every` calls of the jitted update (and at the end of each epoch)."""
    sentences = list(read_sentences(paths, cfg.max_sentence_length))
    vocab = build_vocab(Counter(w for s in sentences for w in s), cfg.min_count)
    ids, sent = encode_corpus(sentences, vocab)
    del sentences
    rng = np.random.default_rng(cfg.seed)
    v, d = len(vocab), cfg.dim
    # word2vec.c's initialisation: input rows uniform in [-0.5/D, 0.5/D), output rows zero.
    w_in = jnp.asarray((rng.random((v, d), np.float32) - 0.5) / d)
    w_out = jnp.zeros((v if cfg.loss == "ns" else v - 1, d), jnp.float32)
    tree = padded_tree(vocab.counts) if cfg.loss == "hs" else None
    table = noise_table(noise_cdf(vocab.counts, cfg.ns_exponent)) if cfg.loss == "ns" else None
    keep = keep_probability(vocab.counts, cfg.sample)
    step = jax.jit(_scan_updates, static_argnames="loss", donate_argnums=(0, 1))
    total_words, calls = cfg.epochs * len(ids), 0
    loss_sum, count, lrs = 0.0, 1.0, np.asarray([cfg.alpha])  # what a call-less epoch reports

    def report(done: float, epoch: int) -> None:
        loss = float(loss_sum) / max(float(count), 1.0)  # a sync, hence every log_every calls
        on_step(Progress(int(done), total_words, loss, float(lrs[-1]), epoch))

    for epoch in range(cfg.epochs):
        kept = np.flatnonzero(rng.random(len(ids)) < keep[ids])
        bounds = np.append(kept, len(ids)) + epoch * len(ids)  # raw position of each kept word
        e_ids, e_sent = ids[kept], sent[kept]
        for start in range(0, len(kept), cfg.chunk_words):
            stop = min(start + cfg.chunk_words, len(kept))
            reach = rng.integers(1, cfg.window + 1, size=stop - start)
            arrays = _examples(cfg, e_ids, e_sent, rng, tree, table, start, stop, reach)
            for batch, lrs, done in _calls(cfg, arrays, bounds[start], bounds[stop], total_words):
                w_in, w_out, loss_sum, count = step(w_in, w_out, *batch, lrs, loss=cfg.loss)
                calls += 1
                if on_step is not None and calls % log_every == 0:
                    report(done, epoch)
        if on_step is not None:
            report((epoch + 1) * len(ids), epoch)
    return Word2Vec(cfg, vocab, np.asarray(w_in), np.asarray(w_out))
