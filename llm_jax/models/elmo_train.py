"""Pretraining ELMo's biLM: `llm-jax train configs/elmo_tiny.yaml`, or `train(cfg)`.

A compact trainer of its own rather than `llm_jax.train.loop`: that loop's data side packs
subword ids from a trained tokenizer and its model side is built from a Transformer
`ModelConfig` (heads, FLOPs, init schemes), while ELMo reads words as characters and
predicts word ids in two directions. What is shared is everything the two can share:
the optax chain (`OptimizerConfig` + `make_optimizer`), the `TrainState`, the verified
`CheckpointManager` (exact resume: the batch of step s is drawn from seed + s), the
`MetricsWriter` (metrics.jsonl, TensorBoard, loss curve), the `Progress` bar, and the
loop's signal handling and non-finite stop (`train.hooks`: SIGTERM/SIGINT saves the step
in flight; a NaN/inf loss raises `NonFiniteLossError`, keeping the last good checkpoint).

Data: each line is a sentence of whitespace-separated words, framed by <S> ... </S>; the
framed sentences are one stream cut into rows of T words (`data.pack`, the original's
recipe), or a sentence a row, right-padded. The word vocabulary keeps the words seen
`min_count` times (at most `max_vocab`, most frequent first); others are <UNK> as targets
but keep their characters as input. A `eval_fraction` of the rows (the last ones) is
held out for the perplexities.

Shape letters: B batch, T words, W characters per word, V word vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml
from flax import nnx

from llm_jax.checkpoint import CheckpointManager
from llm_jax.config import Config, at_least, in_interval
from llm_jax.models.elmo import BOS, EOS, UNK, Elmo, ElmoConfig, encode_chars
from llm_jax.parallel.mesh import logical_axes
from llm_jax.train.hooks import StopOnSignal, nonfinite_error, report_saved_on_signal
from llm_jax.train.metrics import MetricsWriter, Progress, Throughput
from llm_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from llm_jax.train.step import TrainState, new_train_state


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElmoDataConfig(Config):
    """The corpus and how it becomes batches."""

    section: ClassVar[str] = "data"

    paths: tuple[str, ...] = ()
    seq_len: int = 32  # T, words per row including <S> and </S>
    batch_size: int = 32
    min_count: int = 2
    max_vocab: int = 50_000
    max_lines: int = 0  # read at most this many lines (0: all)
    lowercase: bool = False
    eval_fraction: float = 0.05
    # True: the framed sentences as one stream cut into full rows of T words (the original's
    # recipe, no padding); False: a sentence a row (longer ones cut), right-padded.
    pack: bool = True

    def __post_init__(self) -> None:
        if not self.paths:
            raise ValueError("data.paths must list at least one text file (a sentence a line).")
        at_least(self, "seq_len", 3)
        for name in ("batch_size", "min_count", "max_vocab"):
            at_least(self, name, 1)
        at_least(self, "max_lines", 0, note="0 reads every line")
        in_interval(self, "eval_fraction", 0.0, 0.5, high_open=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElmoTrainConfig(Config):
    """The loop: steps, logging, evaluation and checkpoints."""

    section: ClassVar[str] = "train"

    steps: int = 500
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0: evaluate only at the end
    eval_batches: int = 8
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
            at_least(self, name, 1)
        at_least(self, "eval_every", 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElmoRunConfig(Config):
    """A whole ELMo run: the YAML file's sections."""

    section: ClassVar[str] = ""

    name: str = "elmo"
    workdir: str = "runs/elmo"
    model: ElmoConfig = dataclasses.field(default_factory=ElmoConfig)
    data: ElmoDataConfig
    train: ElmoTrainConfig = dataclasses.field(default_factory=ElmoTrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=1e-3, weight_decay=0.0)
    )


def load_run_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ElmoRunConfig:
    """Read a YAML ELMo run config and apply dotted `section.key=value` overrides."""
    from llm_jax.train.config import _yaml, apply_overrides

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; see configs/elmo_tiny.yaml.")
    d = _yaml(path.read_text(encoding="utf-8")) or {}
    cfg = ElmoRunConfig.from_dict(apply_overrides(d, list(overrides)))
    missing = [p for p in cfg.data.paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"data.paths: {missing} not found; give existing text files.")
    return cfg


def is_elmo_config(path: str | os.PathLike) -> bool:
    """Whether a YAML run config is an ELMo one (`model.family: elmo`); False for anything
    unreadable, left for the Transformer loader to report."""
    from llm_jax.train.config import _yaml

    try:
        d = _yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    model = d.get("model") if isinstance(d, dict) else None
    return isinstance(model, dict) and model.get("family") == "elmo"


def run_command(path: str | os.PathLike, overrides: Sequence[str]) -> int:
    """`llm-jax train ELMO_CONFIG [section.key=value ...]`: train, print where it went.
    The exit code is 0, or 128 + the signal number when SIGTERM/SIGINT stopped the run
    (after saving its step)."""
    run = train(load_run_config(path, overrides))
    if run.interrupted is not None:
        print(f"checkpoints: {run.workdir / 'checkpoints'} (rerun to resume)")
        return 128 + run.interrupted
    print(
        f"held-out perplexity: forward {run.eval['forward_ppl']:.1f}, backward "
        f"{run.eval['backward_ppl']:.1f}\ncheckpoints: {run.workdir / 'checkpoints'}\n"
        f"metrics: {run.workdir / 'metrics.jsonl'}"
    )
    return 0


# ------------------------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class WordVocab:
    """The softmax's words, most frequent first after <S>, </S>, <UNK>; their counts."""

    words: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"words": self.words, "counts": self.counts}))

    @classmethod
    def load(cls, path: Path) -> WordVocab:
        d = json.loads(path.read_text())
        return cls(tuple(d["words"]), tuple(d["counts"]))


def read_sentences(paths: Sequence[str], max_lines: int = 0, lowercase: bool = False):
    """Whitespace-split non-empty lines of the files (at most `max_lines` in all; 0: all)."""
    n = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                words = (line.lower() if lowercase else line).split()
                if words:
                    yield words
                    n += 1
                    if max_lines and n >= max_lines:
                        return


def build_vocab(counts: Counter, min_count: int, max_vocab: int) -> WordVocab:
    """<S>, </S>, <UNK>, then the words seen >= min_count times (up to max_vocab in all)."""
    kept = sorted(((w, c) for w, c in counts.items() if c >= min_count), key=lambda x: -x[1])
    kept = [(w, c) for w, c in kept if w not in (BOS, EOS, UNK)][: max(max_vocab - 3, 0)]
    if not kept:
        raise ValueError(
            f"no word of the corpus's {len(counts)} distinct words occurs min_count="
            f"{min_count} times; lower data.min_count or give a larger corpus."
        )
    n = sum(counts.values())
    return WordVocab((BOS, EOS, UNK, *(w for w, _ in kept)), (n, n, 0, *(c for _, c in kept)))


@dataclasses.dataclass
class Corpus:
    """Rows of word types and each type's characters and softmax id.

    Attributes:
      rows: int32 [R, T], type ids, -1 on padding.
      type_chars: int32 [N, W], each distinct word's characters.
      type_words: int32 [N], each distinct word's vocabulary id (<UNK> when out of it).
    """

    rows: np.ndarray
    type_chars: np.ndarray
    type_words: np.ndarray

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """chars [B, T, W], words [B, T], mask [B, T] of rows `idx`."""
        r = self.rows[idx]
        mask = r >= 0
        t = np.where(mask, r, 0)
        chars = self.type_chars[t] * mask[..., None]
        return {"chars": chars, "words": np.where(mask, self.type_words[t], 0), "mask": mask}


def make_corpus(
    sentences: Sequence[list[str]], vocab: WordVocab, seq_len: int, max_chars: int, pack: bool
) -> Corpus:
    """Frame each sentence with <S> ... </S>; with `pack`, cut the stream of them into
    rows of `seq_len` words (the last, short one padded); else cut each sentence into rows
    of <= `seq_len` words, right-padded. Consecutive rows overlap by one word, so every
    next-word pair is in some row."""
    types: dict[str, int] = {}
    framed = [[types.setdefault(w, len(types)) for w in (BOS, *s, EOS)] for s in sentences]
    rows = []
    for ids in [[i for f in framed for i in f]] if pack else framed:
        for start in range(0, max(len(ids) - 1, 1), seq_len - 1):
            piece = ids[start : start + seq_len]
            rows.append(piece + [-1] * (seq_len - len(piece)))
    names = list(types)
    type_chars, _ = encode_chars([names], max_chars)
    index = vocab.index
    unk = index[UNK]
    type_words = np.asarray([index.get(w, unk) for w in names], np.int32)
    return Corpus(np.asarray(rows, np.int32), type_chars[0], type_words)


# ----------------------------------------------------------------------------------- steps


def _objective(model: Elmo, batch: dict[str, jax.Array], rng: jax.Array):
    """The mean of the two directions' mean next-word losses, and their (sum, count);
    `rng` draws the step's dropout."""
    losses = model.lm_losses(batch["chars"], batch["words"], batch["mask"], rng)
    mean = {k: s / jnp.maximum(c, 1.0) for k, (s, c) in losses.items()}
    return 0.5 * (mean["forward"] + mean["backward"]), losses


def make_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, lr_fn: optax.Schedule):
    """Jitted `train_step(state, batch) -> (state, metrics)` and
    `eval_step(params, batch) -> {direction: (sum, count)}`."""

    def train_step(state: TrainState, batch):
        # The dropout key lives in the state (and its checkpoints): a resumed run draws
        # the masks the uninterrupted one would have.
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

        def loss_fn(params):
            return _objective(nnx.merge(graphdef, params), batch, step_rng)

        (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
            "learning_rate": lr_fn(state.step),
        }
        for k, (s, c) in losses.items():
            metrics[f"{k}_ppl"] = jnp.exp(s / jnp.maximum(c, 1.0))
        state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng)
        )
        return state, metrics

    def eval_step(params, batch):
        return nnx.merge(graphdef, params).lm_losses(batch["chars"], batch["words"], batch["mask"])

    return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def evaluate(eval_step, params, corpus: Corpus, batch_size: int, batches: int) -> dict[str, float]:
    """Forward and backward perplexity over the first `batches` batches of `corpus`."""
    sums: dict[str, list[float]] = {"forward": [0.0, 0.0], "backward": [0.0, 0.0]}
    n = len(corpus.rows)
    for b in range(min(batches, -(-n // batch_size))):
        idx = np.arange(b * batch_size, (b + 1) * batch_size) % n  # the last batch wraps
        for k, (s, c) in eval_step(params, corpus.batch(idx)).items():
            sums[k][0] += float(s)
            sums[k][1] += float(c)
    return {f"{k}_ppl": math.exp(s / max(c, 1.0)) for k, (s, c) in sums.items()}


# ------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class ElmoRun:
    """What `train` returns."""

    workdir: Path
    final_step: int
    losses: dict[int, float]
    eval: dict[str, float]  # the final forward/backward perplexities on held-out rows
    seconds: float
    interrupted: int | None = None  # the signal (SIGTERM/SIGINT) that stopped the run


def prepare(cfg: ElmoRunConfig, workdir: Path) -> tuple[WordVocab, Corpus, Corpus, ElmoConfig]:
    """The vocabulary (read from the workdir when resuming), train and held-out rows, and
    the model config with `vocab_size` filled in."""
    dc = cfg.data
    sentences = list(read_sentences(dc.paths, dc.max_lines, dc.lowercase))
    vocab_path = workdir / "vocab.json"
    if vocab_path.is_file():
        vocab = WordVocab.load(vocab_path)
    else:
        vocab = build_vocab(Counter(w for s in sentences for w in s), dc.min_count, dc.max_vocab)
    n_eval = int(len(sentences) * dc.eval_fraction)
    if dc.eval_fraction and n_eval == 0:
        raise ValueError(
            f"data.eval_fraction={dc.eval_fraction} of {len(sentences)} lines holds out none; "
            "raise it or give more lines."
        )
    split = len(sentences) - n_eval
    train_c = make_corpus(sentences[:split], vocab, dc.seq_len, cfg.model.max_chars, dc.pack)
    held_out = sentences[split:] or sentences[-1:]
    eval_c = make_corpus(held_out, vocab, dc.seq_len, cfg.model.max_chars, dc.pack)
    model_cfg = cfg.model
    if model_cfg.vocab_size == 0:
        model_cfg = model_cfg.replace(vocab_size=len(vocab))
    elif model_cfg.vocab_size < len(vocab):
        raise ValueError(
            f"model.vocab_size={model_cfg.vocab_size} is smaller than the vocabulary's "
            f"{len(vocab)} words; leave it 0 (from the corpus) or lower data.max_vocab."
        )
    return vocab, train_c, eval_c, model_cfg


def _fresh_state(cfg: ElmoRunConfig, model_cfg: ElmoConfig):
    """(graphdef, optimizer, step-0 TrainState) of a model built from the run's seed."""
    model = Elmo(model_cfg, rngs=nnx.Rngs(params=jax.random.key(cfg.train.seed)))
    tx = make_optimizer(cfg.optimizer, cfg.train.steps, logical_axes(model))
    graphdef, params = nnx.split(model)
    return graphdef, tx, new_train_state(nnx.to_pure_dict(params), tx, cfg.train.seed)


def train(cfg: ElmoRunConfig) -> ElmoRun:
    """Pretrain (or resume) the biLM described by `cfg`; see the module docstring.

    Signals are handled as in `llm_jax.train.loop.train`: SIGTERM/SIGINT during set-up
    raises `hooks.Interrupted` (nothing to save yet); once steps run, the step in flight
    finishes, is saved, and the run returns with `interrupted` set.

    Raises:
      NonFiniteLossError: a step's loss or gradient norm is NaN/inf; nothing of that step
        is logged or saved, and the last good checkpoint is kept.
    """
    t0 = time.perf_counter()
    tc, workdir = cfg.train, Path(cfg.workdir).absolute()
    with StopOnSignal() as stop:
        workdir.mkdir(parents=True, exist_ok=True)
        vocab, train_c, eval_c, model_cfg = prepare(cfg, workdir)
        vocab.save(workdir / "vocab.json")
        resolved = {**cfg.to_dict(), "model": model_cfg.to_dict()}
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2))
        graphdef, tx, state = _fresh_state(cfg, model_cfg)
        steps = make_steps(graphdef, tx, make_schedule(cfg.optimizer, tc.steps))
        ckpt = CheckpointManager(
            workdir / "checkpoints",
            save_interval_steps=tc.checkpoint_every,
            max_to_keep=tc.keep_checkpoints,
            async_save=False,
        )
        start = 0
        with ckpt:
            if ckpt.latest_step() is not None:
                restored = ckpt.restore(jax.eval_shape(lambda: state))
                state, start = restored.state, restored.step
                print(f"resuming from step {start} in {ckpt.directory}", file=sys.stderr)
            tb = _has("tensorboardX")
            with MetricsWriter(workdir, resume_step=start, tensorboard=tb) as writer:
                stop.defer()
                corpora = (train_c, eval_c)
                state, losses, reached = _loop(
                    cfg, state, start, steps, corpora, (ckpt, writer, stop), resolved
                )
    seconds = time.perf_counter() - t0
    if stop.signal is not None:  # saved; the final evaluation is left to the resumed run
        return ElmoRun(workdir, reached, losses, {}, seconds, interrupted=stop.signal)
    final = evaluate(steps[1], state.params, eval_c, cfg.data.batch_size, tc.eval_batches)
    return ElmoRun(workdir, max(start, tc.steps), losses, final, time.perf_counter() - t0)


def _loop(cfg, state, start, steps, corpora, io, resolved):
    """Steps start+1 .. train.steps, or until a signal: the batch of step s drawn from
    (seed, s), so a resumed run sees the batches the uninterrupted one would have.
    Returns (state, logged losses, the last step run)."""
    tc, (train_step, eval_step), (train_c, eval_c) = cfg.train, steps, corpora
    ckpt, writer, stop = io
    losses: dict[int, float] = {}
    if start >= tc.steps:
        print(
            f"the run is at step {start}, train.steps={tc.steps}: nothing to train; raise "
            "train.steps to continue.",
            file=sys.stderr,
        )
        return state, losses, start
    progress = Progress(tc.steps, initial_step=start, desc="elmo", enabled=tc.progress)
    throughput, step = Throughput(skip_steps=0), start
    with progress:
        for step in range(start + 1, tc.steps + 1):
            rng = np.random.default_rng([tc.seed, step])
            batch = train_c.batch(rng.integers(0, len(train_c.rows), cfg.data.batch_size))
            state, metrics = train_step(state, batch)
            throughput.step(int(batch["mask"].sum()))
            # A host sync every step, as in the Transformer loop: a non-finite step stops
            # the run before anything of it is logged or saved.
            if not bool(metrics["finite"]):
                bad = {k: float(metrics[k]) for k in ("loss", "grad_norm")}
                raise nonfinite_error(step, bad, ckpt, tc.checkpoint_every)
            if step % tc.log_every == 0 or step == tc.steps:
                m = {k: float(v) for k, v in metrics.items()} | throughput.rates()
                losses[step] = m["loss"]
                writer.write(step, m, prefix="train")
                progress.update(step, m)
            if (tc.eval_every and step % tc.eval_every == 0) or step == tc.steps:
                ev = evaluate(eval_step, state.params, eval_c, cfg.data.batch_size, tc.eval_batches)
                writer.write(step, ev, prefix="eval")
                progress.write(
                    f"step {step} held-out perplexity: forward {ev['forward_ppl']:.1f}, "
                    f"backward {ev['backward_ppl']:.1f}"
                )
                throughput.reset()
            force = step == tc.steps or stop.signal is not None
            ckpt.save(step, state, data_state={"step": step}, config=resolved, force=force)
            if stop.signal is not None:
                report_saved_on_signal(progress, stop.signal, step)
                break
    return state, losses, step


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def load(workdir: str | os.PathLike, step: int | None = None) -> tuple[Elmo, WordVocab]:
    """The trained Elmo of a run's workdir (its latest good checkpoint) and its vocabulary."""
    workdir = Path(workdir)
    if not (workdir / "config.json").is_file():
        raise ValueError(f"{workdir} holds no ELMo run (config.json missing); train one first.")
    cfg = ElmoRunConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    graphdef, _, state = _fresh_state(cfg, cfg.model)
    abstract = jax.eval_shape(lambda: state)
    with CheckpointManager(workdir / "checkpoints", async_save=False) as ckpt:
        restored = ckpt.restore(abstract, step)
    return nnx.merge(graphdef, restored.state.params), WordVocab.load(workdir / "vocab.json")


def embed_sentences(
    model: Elmo, sentences: Sequence[Sequence[str]], *, batch_size: int = 64, length: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """ELMo's layers for sentences framed <S> ... </S> (cut to `length` words), batched:
    [N, L+1, T, 2D] float32 and mask [N, T], with T = `length` (one compile)."""
    graphdef, params = nnx.split(model)
    embed = jax.jit(lambda p, c, k: nnx.merge(graphdef, p).embed(c, k))
    framed = [[BOS, *s[: length - 2], EOS] for s in sentences]
    outs, masks = [], []
    for i in range(0, len(framed), batch_size):
        part = framed[i : i + batch_size]
        part = part + [[BOS]] * (batch_size - len(part))  # a full last batch: one shape
        chars, mask = encode_chars(part, model.config.max_chars, length)
        layers = np.asarray(embed(params, chars, mask))  # [L+1, B, T, 2D]
        n = min(batch_size, len(framed) - i)
        outs.append(np.swapaxes(layers, 0, 1)[:n])
        masks.append(mask[:n])
    return np.concatenate(outs), np.concatenate(masks)
