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

Where the time goes (CPU, one XLA thread, measured under load): the jitted update is ~85%
(skip-gram ns) to ~95% (hs) of it, and its cost grows with the output rows per example
(1 + negative, or the longest Huffman path: hs pads every path to it, which is why sg-hs is
the slowest run). The NumPy example building runs on the Python thread while XLA runs the
previous call (JAX dispatches asynchronously), so it is mostly hidden. Flattening the hs
paths to their true lengths was tried and was slower: the extra gather of h per node and
the scatter-add of its gradient cost more than the padding they save.

Sharding: under `jax.set_mesh` the tables' vocabulary rows are split over the data axes and
the batch is replicated (see `_row_sharding` for why). Resumption: every random draw is
seeded by (seed, epoch) or (seed, epoch, chunk), so a checkpoint (tables, epoch, chunk,
counters; `llm_jax.checkpoint.CheckpointManager`, checksummed) resumes bit-exactly.

Defaults follow the original tool and gensim 4 (they agree): dim 100, window 5, negative 5,
ns_exponent 0.75, min_count 5, sample 1e-3, epochs 5, alpha 0.025 -> min_alpha 1e-4.

Shape letters: V vocabulary, D dim, P examples per step, C context slots (1 for skip-gram,
2 * window for CBOW), K output rows per example (1 + negative, or the longest Huffman path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax import ops
from llm_jax.config import Config, at_least, in_interval, one_of
from llm_jax.eval.word_vectors import WordVectors, save_word2vec
from llm_jax.parallel.mesh import data_shards


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


def build_vocab(counts: Mapping[str, int], min_count: int) -> Vocab:
    """Keep the words seen at least `min_count` times, sorted by count (stable: ties keep
    the mapping's order, first seen first for a Counter or `load_corpus`, as gensim).

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
    kept.sort(key=lambda wc: -wc[1])
    return Vocab(tuple(w for w, _ in kept), np.asarray([c for _, c in kept], np.int64))


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """The training corpus as word ids [N] (out-of-vocabulary words dropped, as the
    original) and the sentence id of each position [N]."""

    vocab: Vocab
    ids: np.ndarray  # [N] int32
    sent: np.ndarray  # [N] int32


def load_corpus(
    paths: Sequence[str | os.PathLike], min_count: int, max_sentence_length: int
) -> Corpus:
    """Read, count and encode in one pass: each word gets a first-seen id as it is read
    (one dict lookup per word), counts are a bincount and the vocabulary a remap of those
    ids (a Counter pass then an encoding pass took 3x longer)."""
    first_seen: dict[str, int] = {}
    raw: list[int] = []
    lengths: list[int] = []
    for words in read_sentences(paths, max_sentence_length):
        raw.extend([first_seen.setdefault(w, len(first_seen)) for w in words])
        lengths.append(len(words))
    raw_ids = np.asarray(raw, np.int64)
    counts = np.bincount(raw_ids, minlength=len(first_seen))
    vocab = build_vocab(dict(zip(first_seen, counts.tolist(), strict=True)), min_count)
    remap = np.asarray([vocab.index.get(w, -1) for w in first_seen], np.int64)
    ids = remap[raw_ids] if len(raw_ids) else raw_ids
    sent = np.repeat(np.arange(len(lengths)), lengths)
    known = ids >= 0
    return Corpus(vocab, ids[known].astype(np.int32), sent[known].astype(np.int32))


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


def _rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids]; ids are in range by construction, so XLA skips the clamping."""
    return table.at[ids].get(mode="promise_in_bounds")


def _update(w_in, w_out, tree, batch, lr, *, loss: str):
    """One sparse SGD step on `batch` (lr a scalar): inp/inp_mask [P, C] and

    ns: out/out_mask [P, K], the true word then the negatives;
    hs: out/out_mask [P], the true word and the example's weight; its path comes from
        `tree` = (codes, points, mask) [V, L] held on the device, so that one id per
        example crosses from the host instead of three [P, L] arrays.

    h is the masked mean of the input rows (the row itself for skip-gram); each input row
    receives the full gradient of h, not 1/C of it, as word2vec.c and gensim's cbow_mean do.
    """
    inp, inp_mask, out, out_mask = batch["inp"], batch["inp_mask"], batch["out"], batch["out_mask"]
    rows_in = _rows(w_in, inp)  # [P, C, D]
    n_in = jnp.maximum(jnp.sum(inp_mask, axis=1, keepdims=True), 1.0)
    h = jnp.einsum("pcd,pc->pd", rows_in, inp_mask) / n_in
    if loss == "hs":
        codes_v, points_v, mask_v = tree
        codes, out, out_mask = codes_v[out], points_v[out], mask_v[out] * out_mask[:, None]
    rows_out = _rows(w_out, out)  # [P, K, D]

    def loss_fn(h, rows_out):
        if loss == "ns":
            return ops.negative_sampling_loss(h, rows_out, out_mask)
        return ops.hierarchical_softmax_loss(h, rows_out, codes, out_mask)

    (total, count), (g_h, g_out) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        h, rows_out
    )
    d_in = -lr * g_h[:, None, :] * inp_mask[..., None]  # [P, C, D]
    d = d_in.shape[-1]
    w_in = w_in.at[inp.reshape(-1)].add(d_in.reshape(-1, d), mode="promise_in_bounds")
    w_out = w_out.at[out.reshape(-1)].add((-lr * g_out).reshape(-1, d), mode="promise_in_bounds")
    return w_in, w_out, total, count


def _scan_updates(w_in, w_out, tree, batch, lr, *, loss: str):
    """M sequential `_update`s in one call: `batch` arrays [M, P, ...], lr [M]. Small
    updates in a scan keep the gathered rows in cache; one dispatch per M of them hides the
    call cost (P=512, M=32 is 3x faster per example than one update of P=4096 on CPU)."""

    def body(tables, xs):
        w_in, w_out, total, count = _update(*tables, tree, *xs, loss=loss)
        return (w_in, w_out), (total, count)

    (w_in, w_out), (total, count) = jax.lax.scan(body, (w_in, w_out), (batch, lr))
    return w_in, w_out, jnp.sum(total), jnp.sum(count)


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
    calls: int = 0  # calls of the jitted update so far (the metrics' step)


def _examples(cfg, ids, sent, rng, table, start, stop, reach) -> dict[str, np.ndarray]:
    """One chunk's examples, unpadded, example-major: inp/inp_mask [N, C] and out/out_mask,
    ns: [N, K] the true word then the negatives; hs: [N] the true word and weight 1."""
    if cfg.model == "sg":
        c, x = window_pairs(sent, start, stop, reach, cfg.window)
        inp, inp_mask = ids[x][:, None], np.ones((len(x), 1), np.float32)
    else:
        c, ctx, inp_mask = cbow_contexts(sent, start, stop, reach, cfg.window)
        inp = ids[ctx]
    target = ids[c]
    examples = {"inp": inp.astype(np.int32), "inp_mask": inp_mask}
    if cfg.loss == "hs":
        return {**examples, "out": target.astype(np.int32), "out_mask": np.ones(len(c), np.float32)}
    neg = table[rng.integers(0, len(table), (len(c), cfg.negative), dtype=np.int32)]
    out_mask = np.ones((len(c), 1 + cfg.negative), np.float32)
    out_mask[:, 1:] = neg != target[:, None]  # a negative that drew the true word is skipped
    out = np.concatenate([target[:, None], neg], axis=1).astype(np.int32)
    return {**examples, "out": out, "out_mask": out_mask}


def _fixed_steps(cfg: Word2VecConfig, examples: dict[str, np.ndarray]):
    """Steps of P examples, zero-padded (weight 0) to whole calls of M steps.
    Returns (arrays [S, P, ...], first example of each step [S])."""
    n, p = len(examples["inp"]), cfg.batch
    steps = max(-(-n // (p * cfg.steps_per_call)), 1) * cfg.steps_per_call
    out = {}
    for k, a in examples.items():  # one zeroed buffer filled in place: no concatenate copy
        buf = np.zeros((steps * p, *a.shape[1:]), a.dtype)
        buf[:n] = a
        out[k] = buf.reshape(steps, p, *a.shape[1:])
    return out, np.arange(steps) * p


def _lr(cfg: Word2VecConfig, done: np.ndarray, total_words: int) -> np.ndarray:
    """Linear decay from alpha by raw words done, floored at min_alpha (word2vec.c)."""
    return np.maximum(cfg.alpha * (1.0 - done / (total_words + 1)), cfg.min_alpha)


def _calls(cfg, steps, first, n, raw_lo: float, raw_hi: float, total_words: int):
    """Group steps [S, ...] (S a multiple of M) into calls of M, each with its learning
    rates [M] (by the raw corpus position of each step's first example) and the raw
    position it reaches."""
    m = cfg.steps_per_call
    done = raw_lo + (raw_hi - raw_lo) * np.minimum(first / max(n, 1), 1.0)  # [S]
    lrs = _lr(cfg, done, total_words).astype(np.float32)
    for c in range(len(first) // m):
        reached = done[(c + 1) * m] if (c + 1) * m < len(done) else raw_hi
        yield (
            {k: a[c * m : (c + 1) * m] for k, a in steps.items()},
            lrs[c * m : (c + 1) * m],
            reached,
        )


def _row_sharding(mesh: Mesh | None) -> tuple[NamedSharding | None, NamedSharding | None, int]:
    """(tables, replicated, shard count): vocabulary rows split over the mesh's data axes.

    Why rows, not the batch: a step touches a few thousand of the V rows. With the batch
    split and the tables replicated, every device's scatter-add would have to be summed
    into every replica, a dense [V, D] all-reduce per update. With the rows split and the
    (small) batch replicated, a gather costs one all-reduce of the gathered [P, K, D] rows
    (each device contributes the rows it owns, zeros elsewhere) and the scatter-add needs
    no communication at all: each device adds the updates that fall on its own rows. The
    tables' memory divides by the device count, which is what a large vocabulary needs.
    """
    if mesh is None:
        return None, None, 1
    if any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
        raise ValueError(
            f"word2vec's mesh must have Auto axes (got {mesh.axis_types}); build it with "
            "llm_jax.parallel.make_mesh, whose axes are Auto."
        )
    axes, n = data_shards(mesh)
    return NamedSharding(mesh, PartitionSpec(axes, None)), NamedSharding(mesh, PartitionSpec()), n


def _compile_step(cfg: Word2VecConfig, mesh: Mesh | None):
    """The jitted `_scan_updates` with donated tables (placed on the mesh when given)."""
    rows, rep, _ = _row_sharding(mesh)
    fn = functools.partial(_scan_updates, loss=cfg.loss)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0, 1))
    return jax.jit(
        fn,
        donate_argnums=(0, 1),
        in_shardings=(rows, rows, rep, rep, rep),
        out_shardings=(rows, rows, rep, rep),
    )


def _initial_tables(cfg: Word2VecConfig, v: int, shards: int) -> dict[str, np.ndarray]:
    """word2vec.c's initialisation: input rows uniform in [-0.5/D, 0.5/D), output rows zero;
    rows padded with zeros (never indexed) to a multiple of 64 and of the shard count, so
    that a checkpoint has the same shapes on 1, 2, 4, ..., 64 devices and resumes on any."""
    rng = np.random.default_rng(cfg.seed)
    d = cfg.dim
    w_in = (rng.random((v, d), np.float32) - 0.5) / d
    rows_out = v if cfg.loss == "ns" else v - 1

    def pad(x: np.ndarray) -> np.ndarray:
        return np.pad(x, ((0, -len(x) % math.lcm(64, shards)), (0, 0)))

    return {"w_in": pad(w_in), "w_out": pad(np.zeros((rows_out, d), np.float32))}


@dataclasses.dataclass
class _Run:
    """Where the loop is: tables, position (next chunk of an epoch) and the last outputs."""

    w_in: jax.Array
    w_out: jax.Array
    epoch: int = 0
    chunk: int = 0  # the next chunk of `epoch` to train on
    chunks_done: int = 0  # all epochs: the checkpoint step
    calls: int = 0
    words_done: float = 0.0
    lr: float = 0.0
    loss_sum: jax.Array | float = 0.0
    count: jax.Array | float = 1.0


def _vocab_digest(vocab: Vocab) -> str:
    return hashlib.sha256("\n".join(vocab.words).encode()).hexdigest()


class _Hooks:
    """Progress callback, metrics (JSONL + TensorBoard) and checkpoints around the loop."""

    def __init__(self, cfg, vocab, total_words, on_step, log_every, ckpt, metrics):
        self.cfg, self.vocab, self.total_words = cfg, vocab, total_words
        self.on_step, self.log_every, self.ckpt, self.metrics = on_step, log_every, ckpt, metrics

    def call_done(self, run: _Run) -> None:
        if run.calls % self.log_every == 0:
            self.report(run)

    def report(self, run: _Run) -> None:
        if self.on_step is None and self.metrics is None:
            return
        loss = float(run.loss_sum) / max(float(run.count), 1.0)  # a sync: only when logging
        p = Progress(int(run.words_done), self.total_words, loss, run.lr, run.epoch, run.calls)
        if self.metrics is not None:
            scalars = {"loss": p.loss, "lr": p.lr, "words_done": p.words_done}
            self.metrics.write(run.calls, scalars, prefix="train")
        if self.on_step is not None:
            self.on_step(p)

    def chunk_done(self, run: _Run, *, force: bool = False) -> None:
        if self.ckpt is None:
            return
        data_state = {
            "epoch": run.epoch,
            "chunk": run.chunk,
            "calls": run.calls,
            "words_done": run.words_done,
            "lr": run.lr,
            "seed": self.cfg.seed,
            "vocab_size": len(self.vocab),
            "vocab_sha256": _vocab_digest(self.vocab),
        }
        tables = {"w_in": run.w_in, "w_out": run.w_out}
        config = self.cfg.to_dict()
        self.ckpt.save(run.chunks_done, tables, data_state=data_state, config=config, force=force)


def _restore(ckpt, cfg: Word2VecConfig, vocab: Vocab, init: dict, rows) -> _Run:
    """The run saved last in `ckpt`, checked against this config and corpus."""
    abstract = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows) for k, x in init.items()}
    restored = ckpt.restore(abstract)
    saved, now = restored.config or {}, cfg.to_dict()
    changed = sorted(k for k in now if saved.get(k) != now[k])
    if changed:
        diff = ", ".join(f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in changed)
        raise ValueError(
            f"the checkpoint in {ckpt.directory} was trained with word2vec {diff}; resume "
            f"with the same settings, or start a new --out without --resume."
        )
    data = restored.data_state
    if data["vocab_sha256"] != _vocab_digest(vocab):
        raise ValueError(
            f"the corpus's vocabulary ({len(vocab):,} words) differs from the checkpoint's "
            f"({data['vocab_size']:,}) in {ckpt.directory}; resume on the same --input files."
        )
    state = restored.state
    return _Run(
        state["w_in"],
        state["w_out"],
        epoch=data["epoch"],
        chunk=data["chunk"],
        chunks_done=restored.step,
        calls=data["calls"],
        words_done=data["words_done"],
        lr=data["lr"],
    )


def _train_loop(
    cfg: Word2VecConfig, corpus: Corpus, run: _Run, step, hooks: _Hooks, sync: bool = False
) -> None:
    """The epochs from `run`'s position on. Every random draw comes from a generator seeded
    by (seed, epoch) or (seed, epoch, chunk), so a resumed run redraws exactly what the
    uninterrupted one drew from that position on. `sync`: each call finishes before the
    next is dispatched (see `train`)."""
    n, cw = len(corpus.ids), cfg.chunk_words
    vocab = corpus.vocab
    # The Huffman paths padded to the longest, and their masks, built once, on the device.
    tree = tuple(jnp.asarray(x) for x in padded_tree(vocab.counts)) if cfg.loss == "hs" else None
    table = noise_table(noise_cdf(vocab.counts, cfg.ns_exponent)) if cfg.loss == "ns" else None
    keep = keep_probability(vocab.counts, cfg.sample)
    for epoch in range(run.epoch, cfg.epochs):
        kept = np.flatnonzero(np.random.default_rng([cfg.seed, epoch]).random(n) < keep[corpus.ids])
        bounds = np.append(kept, n) + epoch * n  # raw position of each kept word
        e_ids, e_sent = corpus.ids[kept], corpus.sent[kept]
        for chunk in range(run.chunk if epoch == run.epoch else 0, -(-len(kept) // cw)):
            rng = np.random.default_rng([cfg.seed, epoch, chunk + 1])
            start, stop = chunk * cw, min(chunk * cw + cw, len(kept))
            reach = rng.integers(1, cfg.window + 1, size=stop - start)
            examples = _examples(cfg, e_ids, e_sent, rng, table, start, stop, reach)
            steps, first = _fixed_steps(cfg, examples)
            n_ex, lo, hi = len(examples["inp"]), bounds[start], bounds[stop]
            for batch, lrs, done in _calls(cfg, steps, first, n_ex, lo, hi, hooks.total_words):
                run.w_in, run.w_out, run.loss_sum, run.count = step(
                    run.w_in, run.w_out, tree, batch, lrs
                )
                if sync:
                    jax.block_until_ready(run.count)
                run.calls, run.lr, run.words_done = run.calls + 1, float(lrs[-1]), float(done)
                hooks.call_done(run)
            run.epoch, run.chunk, run.chunks_done = epoch, chunk + 1, run.chunks_done + 1
            hooks.chunk_done(run)
        run.epoch, run.chunk, run.words_done = epoch + 1, 0, (epoch + 1) * n
        hooks.report(run)


def train(
    cfg: Word2VecConfig,
    paths: Sequence[str | os.PathLike],
    *,
    on_step: Callable[[Progress], None] | None = None,
    log_every: int = 5,
    workdir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    mesh: Mesh | None = None,
    tensorboard: bool = False,
) -> Word2Vec:
    """Train on whitespace-tokenised text files (one sentence per line).

    Args:
      cfg: the hyperparameters.
      paths: the corpus files.
      on_step: sees the progress every `log_every` calls of the jitted update (each call is
        `cfg.steps_per_call` updates) and at the end of each epoch.
      workdir: where `checkpoints/` (every `checkpoint_every` chunks of `cfg.chunk_words`
        corpus positions, and at the end) and `metrics.jsonl` go.
      resume: continue from the latest good checkpoint in `workdir` (the same config and
        corpus; checked), else start afresh.
      mesh: run under `jax.set_mesh(mesh)` with the tables' rows split over its data axes.
      tensorboard: also write `workdir/tensorboard/` and `loss_curve.png` (off by default:
        tensorboardX imports torch, which takes longer than training a small model).

    Returns:
      The trained model (the vocabulary's rows only, on the host).
    """
    if (resume or checkpoint_every) and workdir is None:
        raise ValueError("checkpoint_every / resume need a workdir (the CLI's --out).")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every={checkpoint_every} must be >= 0 (0: no checkpoints).")
    from llm_jax.checkpoint import CheckpointManager
    from llm_jax.train.metrics import MetricsWriter

    corpus = load_corpus(paths, cfg.min_count, cfg.max_sentence_length)
    rows, _, shards = _row_sharding(mesh)
    init = _initial_tables(cfg, len(corpus.vocab), shards)
    with contextlib.ExitStack() as stack:
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))
        ckpt = metrics = None
        if checkpoint_every or resume:
            every = max(checkpoint_every, 1)
            ckpt = CheckpointManager(
                Path(workdir) / "checkpoints", save_interval_steps=every, max_to_keep=2
            )
            stack.enter_context(ckpt)
        resumed = resume and ckpt.latest_step() is not None
        run = (
            _restore(ckpt, cfg, corpus.vocab, init, rows)
            if resumed
            else _Run(*(jax.device_put(init[k], rows) for k in ("w_in", "w_out")), lr=cfg.alpha)
        )
        if workdir is not None:
            metrics = stack.enter_context(
                MetricsWriter(
                    workdir,
                    resume_step=run.calls if resumed else None,
                    tensorboard=tensorboard,
                    loss_curve=tensorboard,
                )
            )
        total = cfg.epochs * len(corpus.ids)
        saver = ckpt if checkpoint_every else None
        hooks = _Hooks(cfg, corpus.vocab, total, on_step, log_every, saver, metrics)
        # XLA:CPU runs every (fake) device's part of a call on one shared thread pool; with
        # a second call dispatched while the first runs, the step's all-reduce can wait for
        # a participant that never gets a thread, and XLA aborts the process after 40 s.
        sync = mesh is not None and mesh.size > 1 and jax.default_backend() == "cpu"
        _train_loop(cfg, corpus, run, _compile_step(cfg, mesh), hooks, sync)
        if hooks.ckpt is not None:
            hooks.chunk_done(run, force=True)
        v = len(corpus.vocab)  # the rows past these are the shards' padding
        w_in, w_out = np.asarray(run.w_in)[:v], np.asarray(run.w_out)[: v - (cfg.loss == "hs")]
    return Word2Vec(cfg, corpus.vocab, w_in, w_out)
