"""The periodic actions of the training loop, and its signal handling.

Each hook is called after every step as `hook(run, step, metrics)` (metrics already on the
host) and decides itself whether it is due: `NonFinite` (the non-finite policy),
`LogEvery` (metrics, progress bar, throughput), `EvalEvery` and `CheckpointEvery` (also
at the last step and after a signal). Eval and checkpoint time is kept out of tokens/s
and MFU by resetting the shared `Throughput` after them.

`StopOnSignal` turns SIGTERM/SIGINT into `Interrupted` during start-up (nothing to save
yet) and into a flag the loop checks between steps once it runs.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import TYPE_CHECKING, Any, Literal

import jax

from llm_jax.train import task_eval

if TYPE_CHECKING:
    from llm_jax.train.compile import CompiledSteps
    from llm_jax.train.loop import Run
    from llm_jax.train.metrics import Throughput


class Interrupted(BaseException):
    """SIGTERM/SIGINT arrived during start-up, before there was anything to save.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it.
    """

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf and `train.on_nonfinite` is 'stop'."""


class StopOnSignal:
    """SIGTERM/SIGINT handling for one run (a context manager; restores the old handlers).

    Until `defer()` a signal raises `Interrupted`; after it, a signal only sets `signal`,
    which the loop checks between steps (so the step in flight finishes and is saved).
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._deferred = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def defer(self) -> None:
        """From now on a signal stops the loop after the current step instead of raising."""
        self._deferred = True

    def _handle(self, signum, frame) -> None:
        if not self._deferred:
            raise Interrupted(signum)
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate(steps: CompiledSteps, params, batches, main_loss: str) -> dict[str, float]:
    """Mean losses (and perplexity of `main_loss`, the objective spec's) over the given eval
    batches."""
    sums: dict[str, list[float]] = {}
    for batch in batches:
        for name, (s, c) in jax.device_get(steps.eval(params, batch)).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(c)
    return task_eval.mean_losses(sums, main_loss)


@dataclasses.dataclass
class NonFinite:
    """'stop' raises `NonFiniteLossError` at a non-finite step (before anything of it is
    saved); 'skip' leaves it to the step, which already kept the state unchanged."""

    policy: Literal["stop", "skip"]

    def __call__(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        if metrics["finite"] or self.policy != "stop":
            return
        raise nonfinite_error(
            step,
            metrics,
            run.ckpt,
            run.cfg.train.checkpoint_every,
            remedy="or set train.on_nonfinite=skip",
        )


def nonfinite_error(
    step: int, metrics: dict[str, float], ckpt, checkpoint_every: int, remedy: str = ""
) -> NonFiniteLossError:
    """The error of a non-finite step, naming the last good checkpoint kept (or that none
    was saved yet) and what to change; `remedy` adds a loop's own option."""
    last = ckpt.latest_step()
    kept = (
        f"the last good checkpoint (step {last}) in {ckpt.directory} is kept"
        if last is not None
        else f"no checkpoint was saved yet (train.checkpoint_every={checkpoint_every})"
    )
    fixes = "lower optimizer.learning_rate, raise optimizer.warmup_steps"
    fixes = f"{fixes}, {remedy}" if remedy else fixes.replace(", raise", " or raise")
    return NonFiniteLossError(
        f"non-finite loss ({metrics['loss']}) or gradient norm ({metrics['grad_norm']}) at "
        f"step {step}; {kept}. {fixes[0].upper()}{fixes[1:]}."
    )


def report_saved_on_signal(progress, signum: int, step: int) -> None:
    """Say that a signal stopped the run after saving `step`: above the progress bar
    without breaking it, else on stderr (even with train.progress=false)."""
    message = f"received signal {signum}: saved step {step}, exiting"
    if progress.enabled:
        progress.write(message)
    elif jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


@dataclasses.dataclass
class LogEvery:
    """Every `n` steps and at the last: train metrics + tokens/s (+ MFU) to the writer and
    the progress display."""

    n: int
    last: int
    tokens_per_step: int
    throughput: Throughput

    def __call__(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        self.throughput.step(self.tokens_per_step)
        if step % self.n and step != self.last:
            return
        metrics = {**metrics, **self.throughput.rates()}
        run.writer.write(step, {f"train/{k}": v for k, v in metrics.items()})
        run.progress.update(step, metrics)


@dataclasses.dataclass
class EvalEvery:
    """Every `n` steps and at the last: mean eval losses over the same eval batches, with
    the task's metrics (`task_eval`: accuracy and macro-F1; BLEU/chrF if asked)."""

    n: int
    last: int
    throughput: Throughput
    main_loss: str  # the objective's, reported as perplexity

    def __call__(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        if step % self.n and step != self.last:
            return
        ev = task_eval.evaluate_validation(run, run.state.params, self.main_loss)
        if ev.scalars:
            run.eval_losses[step] = ev.scalars["loss"]
            fields = {f"eval/{k}": v for k, v in ev.fields.items()}
            run.writer.write(step, {f"eval/{k}": v for k, v in ev.scalars.items()}, fields=fields)
            run.progress.write(f"step {step}: eval {ev.line()}")
        self.throughput.reset()


@dataclasses.dataclass
class CheckpointEvery:
    """At the manager's interval, at the last step and after a signal: save the state, the
    data iterator's position, the resolved config and the tokenizer."""

    last: int
    stop: StopOnSignal
    throughput: Throughput

    def __call__(self, run: Run, step: int, metrics: dict[str, float]) -> None:
        if not (run.ckpt.should_save(step) or step == self.last or self.stop.signal is not None):
            return
        run.ckpt.save(
            step,
            run.state,
            data_state=run.batches.get_state(),
            config=run.resolved,
            tokenizer_dir=str(run.data.tokenizer_dir),
            force=True,
        )
        if self.stop.signal is not None:
            report_saved_on_signal(run.progress, self.stop.signal, step)
        self.throughput.reset()
