"""What the `colab/` notebooks share: the runtime, smoke-mode sizes, data, a live loss plot.

Every notebook runs top to bottom in two modes: full size on a Colab TPU v5e / GPU runtime,
and a smoke mode (`LLM_JAX_SMOKE=1`, what CI executes on CPU) that shrinks steps and sizes
through `pick(smoke=..., full=...)` and compiles at XLA's optimisation level 0. Data come
from the project's `../shared/data` when it is beside the checkout (or `$LLM_JAX_DATA`),
else from the excerpts committed under `tests/data`, else from text the notebook writes
itself; never from the network.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "SMOKE",
    "LiveLossPlot",
    "data_dir",
    "find_data",
    "pick",
    "repo_root",
    "runtime",
    "show_devices",
    "table",
]

SMOKE = os.environ.get("LLM_JAX_SMOKE", "") not in ("", "0")
if SMOKE:
    # Smoke runs are compile-bound (tiny models, a few steps): XLA's backend optimisation
    # level 0 compiles them about a third faster. Importing this module before JAX starts
    # is what the notebooks do; flags the user set are left alone.
    os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")


def pick(*, smoke: T, full: T) -> T:
    """`smoke` when `LLM_JAX_SMOKE` is set (CI's quick CPU run), else `full`."""
    return smoke if SMOKE else full


def runtime() -> str:
    """'tpu', 'gpu' or 'cpu': the platform of JAX's default backend."""
    import jax

    platform = jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def show_devices() -> str:
    """Print and return a one-line summary of the runtime and its devices."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    line = (
        f"runtime {runtime()}: {len(devices)} device(s) ({', '.join(kinds)}), "
        f"{jax.process_count()} process(es), jax {jax.__version__}"
        + (" — smoke mode (LLM_JAX_SMOKE=1)" if SMOKE else "")
    )
    print(line)
    return line


def repo_root() -> Path | None:
    """The checkout this package runs from (an editable install), or None (pip from git)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "colab").is_dir() else None


def data_dir() -> Path | None:
    """Where the whole corpora are: `$LLM_JAX_DATA`, else `../shared/data` beside the
    checkout, else None (a bare clone or a Colab install)."""
    if env := os.environ.get("LLM_JAX_DATA"):
        return Path(env)
    root = repo_root()
    if root is not None and (root.parent / "shared" / "data").is_dir():
        return root.parent / "shared" / "data"
    return None


def find_data(*names: str) -> Path | None:
    """The first of `names` found in `data_dir()`, else in the checkout's `tests/data`
    excerpts, else None (the notebook then writes its own text)."""
    roots = [data_dir(), repo_root() and repo_root() / "tests" / "data"]
    for root in roots:
        for name in names:
            if root is not None and (root / name).exists():
                return root / name
    return None


class LiveLossPlot:
    """A `train(cfg, callbacks=[...])` callback that redraws the loss curve in a notebook.

    Redraws every `every` steps (train loss, and the held-out loss as the run evaluates)
    and once at the last step; outside IPython it only records. `figure()` draws it again.
    """

    def __init__(self, every: int = 10, title: str = "loss"):
        self.every, self.title = every, title
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.eval_losses: dict[int, float] = {}
        self._handle: Any = None

    def __call__(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        self.steps.append(step)
        self.losses.append(metrics["loss"])
        self.eval_losses = dict(run.eval_losses)
        if step % self.every == 0 or step == run.cfg.train.steps:
            self._redraw()

    def figure(self) -> Any:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(self.steps, self.losses, label="train", lw=1)
        if self.eval_losses:
            steps, values = zip(*sorted(self.eval_losses.items()), strict=True)
            ax.plot(steps, values, "o-", label="held-out")
        ax.set(xlabel="step", ylabel="loss (nats/token)", title=self.title)
        ax.legend()
        fig.tight_layout()
        plt.close(fig)
        return fig

    def _redraw(self) -> None:
        try:
            from IPython import get_ipython
            from IPython.display import display
        except ImportError:
            return
        if get_ipython() is None:
            return
        fig = self.figure()
        if self._handle is None:
            self._handle = display(fig, display_id=True)
        else:
            self._handle.update(fig)


def table(rows: Iterable[dict[str, Any]]) -> str:
    """A Markdown table of `rows` (dicts with the same keys), floats to 4 significant
    digits; printed by the notebooks so that their figures read the same everywhere."""
    rows = list(rows)
    if not rows:
        return ""
    keys = list(rows[0])

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)
