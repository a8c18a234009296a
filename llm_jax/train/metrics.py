"""Training metrics: a JSONL + TensorBoard writer, a progress display and a throughput meter.

Metric names follow a `split/name` convention: `train/loss`, `train/learning_rate`,
`train/tokens_per_second`, `train/mfu`, `eval/loss`, ... `MetricsWriter.write(step,
{"loss": ...}, prefix="train")` adds the prefix. Each `write` call becomes one JSON object
on one line of `metrics.jsonl`:

  {"step": 100, "time": 1718000000.0, "train/loss": 3.21, "train/learning_rate": 0.0003}

`time` is Unix wall time in seconds; non-finite values are written as `null` (JSON has no
NaN). The same scalars go to TensorBoard (tag = key) and, at `close()`, every `*/loss`
series is drawn into `loss_curve.png`. A run resumed from a checkpoint passes
`resume_step`, so the records an interrupted run wrote after that step are dropped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import jax
import numpy as np

from llm_jax.train.flops import format_mfu, mfu

METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "time")


def _scalar(key: str, value: Any) -> int | float:
    """A Python int/float from a Python, NumPy or JAX scalar (a device→host transfer)."""
    if isinstance(value, bool | int | float):
        return value if isinstance(value, float) else int(value)
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(
            f"metric {key!r} has shape {array.shape}; write scalars only (reduce it first, "
            "e.g. with .mean())."
        )
    item = array.reshape(()).item()
    if isinstance(item, bool | int):
        return int(item)
    if isinstance(item, float):
        return item
    raise ValueError(f"metric {key!r} is {type(item).__name__}; write numbers only.")


def _summary_writer_class() -> type:
    """tensorboardX's `SummaryWriter`, imported without torch when torch is not loaded yet.

    tensorboardX imports torch, when installed, only to name a type in its annotations;
    that import costs ~3 s of every run's start-up (each `llm-jax train` process), and
    scalars never need it.
    """
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # a tensorboardX that needs torch after all: import it the slow way
        SummaryWriter = None
    finally:
        del sys.modules["torch"]
    if SummaryWriter is None:
        sys.modules.pop("tensorboardX", None)
        from tensorboardX import SummaryWriter
    return SummaryWriter


class MetricsWriter:
    """Writes scalars to `workdir/metrics.jsonl` and TensorBoard; draws the loss curve.

    Only one process writes (by default process 0); on the others every method is a no-op
    and nothing is created. Use as a context manager or call `close()`.

    Args:
      workdir: directory for `metrics.jsonl`, `tensorboard/` and `loss_curve.png`
        (created if missing). An existing `metrics.jsonl` is appended to, so a resumed run
        continues its curve.
      enabled: whether this process writes; default `jax.process_index() == 0`.
      resume_step: the step a resumed run restarts from: JSONL records with a larger step
        (written after the checkpoint by the interrupted run) are removed, and TensorBoard
        is told to purge its events from `resume_step + 1` on. None keeps everything.
      run_name: the loss-curve title; default the workdir's name.
      tensorboard: also write TensorBoard event files (needs `tensorboardX`).
      loss_curve: draw `loss_curve.png` at `close()` (needs `matplotlib`).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        enabled: bool | None = None,
        resume_step: int | None = None,
        run_name: str | None = None,
        tensorboard: bool = True,
        loss_curve: bool = True,
    ):
        self.workdir = Path(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.run_name = run_name or self.workdir.resolve().name
        self.loss_curve = loss_curve
        self._jsonl: TextIO | None = None
        self._tb = None
        if not self.enabled:
            return
        if tensorboard:
            try:
                SummaryWriter = _summary_writer_class()
            except ImportError as e:
                raise ImportError(
                    "MetricsWriter(tensorboard=True) needs tensorboardX: `pip install "
                    "tensorboardX`, or pass tensorboard=False."
                ) from e
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.jsonl_path.exists():
            _truncate_after(self.jsonl_path, resume_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(
                str(self.workdir / TENSORBOARD_DIR), flush_secs=30, purge_step=purge
            )

    @property
    def jsonl_path(self) -> Path:
        return self.workdir / METRICS_FILE

    @property
    def loss_curve_path(self) -> Path:
        return self.workdir / LOSS_CURVE_FILE

    def write(
        self,
        step: int,
        metrics: Mapping[str, Any],
        *,
        prefix: str | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> None:
        """Record scalar `metrics` at `step` (one JSONL line, one TensorBoard point each).

        Args:
          step: the global training step (an int).
          metrics: name → scalar (Python, NumPy or 0-d JAX value; each is fetched to the
            host, so call this on logging steps only).
          prefix: the split, prepended as `prefix/name` (e.g. "train", "eval").
          fields: JSON values written as they are into the JSONL record only, not to
            TensorBoard (a `"split": "test"` tag, a confusion matrix as nested lists).
        """
        if not self.enabled:
            return
        if self._jsonl is None:
            raise ValueError("MetricsWriter.write after close(); open a new writer.")
        now = time.time()
        record: dict[str, Any] = {"step": int(step), "time": now}
        for key, value in metrics.items():
            name = f"{prefix}/{key}" if prefix else key
            if name in _RESERVED:
                raise ValueError(
                    f"metric name {name!r} is reserved in the JSONL record; rename it or pass "
                    "a prefix (e.g. prefix='train')."
                )
            x = _scalar(name, value)
            record[name] = x if math.isfinite(x) else None
            if self._tb is not None:
                self._tb.add_scalar(name, x, int(step), walltime=now)
        for key, value in (fields or {}).items():
            if key in record:
                raise ValueError(f"fields[{key!r}] would overwrite a metric or {_RESERVED}.")
            record[key] = value
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files, then draw `loss_curve.png`. Safe to call twice."""
        if self._jsonl is None:
            return
        self._jsonl.close()
        self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.loss_curve:
            plot_loss_curve(self.jsonl_path, self.loss_curve_path, self.run_name)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, in file order.

    A last line cut short (a process killed mid-write) is skipped; a bad line elsewhere
    raises `json.JSONDecodeError`.
    """
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Rewrite `path` without the records after `step` (atomically: write, then rename)."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


def _ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = beta * acc + (1 - beta) * v
        out[i] = acc / (1 - beta ** (i + 1))
    return out


# An EMA lags a falling loss by about 1 / (1 - beta) points; drawn only when that lag is a
# small part of the curve, where it shows the trend through noise instead of sitting above
# a short run's raw loss.
EMA_BETA = 0.9
EMA_MIN_POINTS = 200


def ema_beta(num_points: int) -> float | None:
    """The smoothing drawn over a training-loss line of `num_points` (None: raw line only)."""
    return EMA_BETA if num_points >= EMA_MIN_POINTS else None


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path, title: str) -> bool:
    """Draw every `split/loss` series of a `metrics.jsonl` against step into a PNG.

    Training loss is a line (with an EMA over it from `EMA_MIN_POINTS` points); other splits
    (eval) are points. A step written twice (a resumed run) keeps its latest value. The y
    axis is logarithmic when the losses span more than a factor of 10.

    Returns:
      True if a PNG was written; False when the file holds no finite loss.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, dict[int, float]] = {}
    for record in read_metrics(metrics_path):
        for key, value in record.items():
            if key.rsplit("/", 1)[-1] == "loss" and value is not None and math.isfinite(value):
                series.setdefault(key, {})[record["step"]] = value
    if not series:
        return False
    # An explicit Agg canvas: no pyplot, so a notebook's backend is left alone.
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key in sorted(series, key=lambda k: (not k.startswith("train"), k)):
        steps = np.array(sorted(series[key]))
        values = np.array([series[key][s] for s in steps])
        if key.startswith("train"):
            beta = ema_beta(len(values))
            ax.plot(steps, values, lw=1, alpha=1.0 if beta is None else 0.35, label=key)
            if beta is not None:
                lag = round(1 / (1 - beta))
                ax.plot(
                    steps,
                    _ema(values, beta),
                    lw=1.8,
                    color=ax.lines[-1].get_color(),
                    label=f"{key}, EMA {beta} (trails by ~{lag} points)",
                )
        else:
            ax.plot(steps, values, marker="o", ms=4, lw=1, label=key)
    lows = [min(v.values()) for v in series.values()]
    highs = [max(v.values()) for v in series.values()]
    if min(lows) > 0 and max(highs) / min(lows) > 10:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    return True


# Progress -----------------------------------------------------------------------------------


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _interactive(file: TextIO) -> bool:
    """A terminal, or a Jupyter/Colab kernel (whose stdout is not a TTY but renders bars)."""
    if "ipykernel" in sys.modules:
        return True
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


def format_postfix(metrics: Mapping[str, Any]) -> str:
    """'loss 3.2150 | lr 3.00e-04 | tok/s 12.3k | mfu 41.2%' from a metrics dict.

    Reads `loss`, `learning_rate` (or `lr`), `examples_per_second`, `tokens_per_second`,
    `mfu` and `teacher_mfu`, bare or with a `train/` prefix; a missing one is left out,
    except MFU which reads "n/a" (evaluation's examples/s lines, which measure no MFU,
    leave it out too).
    """
    m = {k.removeprefix("train/"): v for k, v in metrics.items()}
    parts = []
    if m.get("loss") is not None:
        parts.append(f"loss {float(m['loss']):.4f}")
    lr = m.get("learning_rate", m.get("lr"))
    if lr is not None:
        parts.append(f"lr {float(lr):.2e}")
    if m.get("examples_per_second") is not None:
        parts.append(f"ex/s {_human(float(m['examples_per_second']))}")
    if m.get("tokens_per_second") is not None:
        parts.append(f"tok/s {_human(float(m['tokens_per_second']))}")
    value = m.get("mfu")
    if value is None and m.get("examples_per_second") is not None:
        return " | ".join(parts)
    parts.append(f"mfu {format_mfu(None if value is None else float(value))}")
    if m.get("teacher_mfu") is not None:  # a distillation run: the teacher's part of it
        parts[-1] += f" (teacher {format_mfu(float(m['teacher_mfu']))})"
    return " | ".join(parts)


class Progress:
    """Step/total, loss, lr, tokens/s and MFU: a tqdm bar on a terminal or in a notebook, a
    plain log line every `log_every` steps otherwise (CI logs, `nohup`), so no `\\r` spam.

    Args:
      total_steps: the step the run ends at.
      initial_step: the step it starts from (a resumed run).
      desc: a label in front of the bar / line.
      unit: what is counted ("step"; evaluation counts examples, "ex").
      log_every: steps between log lines when not interactive; default total/20.
      file: the stream; default sys.stdout.
      enabled: default `jax.process_index() == 0`; a disabled Progress prints nothing.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        *,
        desc: str = "train",
        unit: str = "step",
        log_every: int | None = None,
        file: TextIO | None = None,
        enabled: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0 <= initial_step <= total_steps:
            raise ValueError(
                f"initial_step={initial_step} must be in [0, total_steps={total_steps}]."
            )
        self.total, self.step, self.desc, self.unit = total_steps, initial_step, desc, unit
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.file = sys.stdout if file is None else file
        self.log_every = max(1, total_steps // 20) if log_every is None else log_every
        self._clock = clock
        self._metrics: dict[str, Any] = {}
        self._last_logged = initial_step
        self._t0: float | None = None  # after the first update: excludes compile time
        self._step0 = initial_step
        self._bar = None
        if self.enabled and _interactive(self.file):
            if "ipykernel" in sys.modules:
                from tqdm.auto import tqdm
            else:
                from tqdm import tqdm
            self._bar = tqdm(
                total=total_steps,
                initial=initial_step,
                desc=desc,
                unit=unit,
                file=self.file,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Advance to `step` (steps completed); `metrics` replace the ones shown."""
        if not self.enabled:
            return
        if metrics:
            self._metrics = dict(metrics)
        if self._t0 is None:
            self._t0, self._step0 = self._clock(), step
        self.step = step
        if self._bar is not None:
            if metrics:
                self._bar.set_postfix_str(format_postfix(self._metrics), refresh=False)
            self._bar.update(step - self._bar.n)
        elif step - self._last_logged >= self.log_every or step >= self.total:
            self._log()

    def write(self, message: str) -> None:
        """Print a message (an eval result, a warning) without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def _log(self) -> None:
        self._last_logged = self.step
        pct = 100 * self.step / max(self.total, 1)
        line = f"{self.desc} {self.unit} {self.step}/{self.total} ({pct:.0f}%) | "
        line += format_postfix(self._metrics)
        elapsed = self._clock() - self._t0
        done = self.step - self._step0
        if done > 0 and self.step < self.total:
            line += f" | eta {_duration(elapsed / done * (self.total - self.step))}"
        print(line, file=self.file, flush=True)

    def close(self) -> None:
        """Close the bar, or print the last line if it was not printed yet."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._t0 is not None and self._last_logged != self.step:
            self._log()
        self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# Throughput ---------------------------------------------------------------------------------


class Throughput:
    """Tokens/s, steps/s and MFU over the interval since the last `rates()` call.

    The first `skip_steps` steps (compilation) are not timed: the interval starts when the
    last of them is reported. JAX dispatches asynchronously, so call `rates()` right after a
    host sync (e.g. after fetching the loss), and `reset()` after an evaluation or a
    checkpoint so their time is not charged to training.

    Args:
      skip_steps: leading steps left out of the timing.
      flops_per_token: model FLOPs per token (`flops.model_flops_per_token`); with
        `peak_flops_per_device` it adds "mfu" to `rates()`.
      teacher_flops_per_token: a distillation teacher's forward FLOPs per token
        (`flops.teacher_flops_per_token`). Then "mfu" is the hardware's whole model-FLOPs
        utilisation, the student's training FLOPs plus the teacher's forward, and
        "teacher_mfu" is the teacher's part of it (the student's is the difference, which
        is comparable with a run without a teacher).
      num_devices: devices the step runs on.
      peak_flops_per_device: from `flops.peak_flops_per_device`; None (CPU, unknown) leaves
        "mfu" out, which the progress display shows as "n/a".
      clock: seconds, monotonic (tests pass a fake).
    """

    def __init__(
        self,
        *,
        skip_steps: int = 1,
        flops_per_token: float | None = None,
        num_devices: int = 1,
        peak_flops_per_device: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
        teacher_flops_per_token: float = 0.0,
    ):
        self.skip_steps = skip_steps
        self.flops_per_token = flops_per_token
        self.teacher_flops_per_token = teacher_flops_per_token
        self.num_devices = num_devices
        self.peak = peak_flops_per_device
        self._clock = clock
        self._seen = 0
        self._start: float | None = clock() if skip_steps == 0 else None
        self._tokens = 0
        self._steps = 0

    def step(self, tokens: int) -> None:
        """Report one finished (or dispatched) step that processed `tokens` tokens globally.

        Count every token the step computed on, padding included: that is what the FLOPs
        were spent on.
        """
        self._seen += 1
        if self._seen <= self.skip_steps:
            self._start = self._clock()
            return
        self._tokens += int(tokens)
        self._steps += 1

    def reset(self) -> None:
        """Start a new interval now, dropping the steps counted so far."""
        if self._seen >= self.skip_steps:
            self._start = self._clock()
        self._tokens = self._steps = 0

    def rates(self) -> dict[str, float]:
        """{'tokens_per_second', 'steps_per_second'[, 'mfu'[, 'teacher_mfu']]} since the
        last call, then start a new interval; {} when no timed step has finished yet."""
        now = self._clock()
        if self._start is None or self._steps == 0 or now <= self._start:
            return {}
        seconds = now - self._start
        out = {
            "tokens_per_second": self._tokens / seconds,
            "steps_per_second": self._steps / seconds,
        }
        if self.flops_per_token is not None:
            total = self.flops_per_token + self.teacher_flops_per_token
            value = mfu(out["tokens_per_second"], total, self.num_devices, self.peak)
            if value is not None:
                out["mfu"] = value
                if self.teacher_flops_per_token:
                    out["teacher_mfu"] = value * self.teacher_flops_per_token / total
        self._start, self._tokens, self._steps = now, 0, 0
        return out
