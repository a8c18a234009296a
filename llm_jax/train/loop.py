"""The training loop behind `llm-jax train`: data, sharded steps, evaluation, metrics,
checkpoints with exact resume, clean shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax

from llm_jax.checkpoint import CheckpointManager
from llm_jax.data.objectives import objective_spec
from llm_jax.parallel.mesh import describe, initialize_distributed, make_mesh
from llm_jax.parallel.rules import activation_sharding
from llm_jax.train import data as train_data
from llm_jax.train.allocator import allocator_hint
from llm_jax.train.config import RunConfig
from llm_jax.train.flops import flops_and_tokens, mfu, peak_flops_per_device
from llm_jax.train.metrics import MetricsWriter, Progress
from llm_jax.train.step import LossConfig
from llm_jax.train.trainer import Trainer


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf and `train.on_nonfinite` is 'stop'."""


@dataclasses.dataclass
class RunResult:
    workdir: Path
    final_step: int
    losses: dict[int, float]  # train loss per step run in this process
    eval_losses: dict[int, float]
    checkpoint_dir: Path
    metrics_path: Path
    loss_curve: Path


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_float(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def evaluate(trainer: Trainer, params, batches, main_loss: str) -> dict[str, float]:
    """Mean losses (and perplexity of `main_loss`, the spec's) over the given eval batches."""
    sums: dict[str, list[float]] = {}
    for batch in batches:
        for name, (s, c) in jax.device_get(trainer.eval_losses(params, batch)).items():
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(s)
            acc[1] += float(c)
    out = {f"{k}_loss": s / max(c, 1.0) for k, (s, c) in sums.items()}
    main = out.get(f"{main_loss}_loss")
    if main is not None:
        out["loss"] = sum(out.values())
        out["perplexity"] = math.exp(min(main, 50.0))
    return out


def train(cfg: RunConfig) -> RunResult:
    """Run (or resume) the training job described by `cfg`. See the module docstring."""
    initialize_distributed(**dataclasses.asdict(cfg.distributed))
    workdir = Path(cfg.workdir).absolute()
    tc = cfg.train
    is_main = jax.process_index() == 0

    # Everything that can fail on bad input happens before any compilation.
    data = train_data.prepare(cfg.data, workdir)
    model_config = cfg.model_config(data.tokenizer.vocab_size)
    if data.tokenizer.vocab_size > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {data.tokenizer.vocab_size} ids but model.vocab_size is "
            f"{model_config.vocab_size}; remove model.vocab_size to take the tokenizer's, or "
            f"train a tokenizer with data.vocab_size <= {model_config.vocab_size}."
        )
    mesh = make_mesh(cfg.mesh)
    trainer = Trainer(
        model_config,
        cfg.optimizer,
        mesh,
        total_steps=tc.steps,
        objective=cfg.data.objective,
        rules=cfg.mesh.rules,
        loss_config=LossConfig(label_smoothing=tc.label_smoothing, z_loss=tc.z_loss),
        grad_accum_steps=tc.grad_accum_steps,
        skip_nonfinite=tc.on_nonfinite == "skip",
        seed=tc.seed,
    )
    trainer.check_batch_size(cfg.data.batch_size)
    resolved = cfg.to_dict()
    resolved["model"] = model_config.to_dict()

    ckpt = CheckpointManager(
        workdir / "checkpoints",
        save_interval_steps=tc.checkpoint_every,
        max_to_keep=tc.keep_checkpoints,
        async_save=tc.async_checkpoint,
    )
    train_iter = data.train_iterator(mesh)
    with activation_sharding(mesh, trainer.rules):
        if ckpt.latest_step() is not None:
            restored = ckpt.restore(trainer.abstract_state)
            state = restored.state
            train_iter.set_state(restored.data_state)
            start = restored.step
            if is_main:
                print(f"resuming from step {start} in {ckpt.directory}", file=sys.stderr)
        else:
            state = trainer.init_state()
            start = 0
        first = next(train_iter)
        compiled = trainer.compile_step(first)
    if is_main:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2))
        print(f"mesh: {describe(mesh)}; rules: {cfg.mesh.rules}", file=sys.stderr)
        mem = compiled.memory_analysis()
        if mem is not None:
            print(f"compiled step memory: {_memory_line(mem)}", file=sys.stderr)
            hint = allocator_hint(jax.default_backend(), mem.temp_size_in_bytes)
            if hint:
                print(hint, file=sys.stderr)

    spec = objective_spec(cfg.data.objective)
    flops, tokens_per_step = flops_and_tokens(model_config, spec, first)
    peak = peak_flops_per_device()
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start)
    progress = Progress(tc.steps, initial_step=start, enabled=is_main and tc.progress)
    losses: dict[int, float] = {}
    eval_losses: dict[int, float] = {}
    batch = first
    step = start
    last_time = time.perf_counter()
    last_step = start
    try:
        with _StopFlag() as stop:
            while step < tc.steps:
                state, metrics = trainer.step(state, batch)
                step += 1
                m = _to_float(metrics)
                losses[step] = m["loss"]
                if not m["finite"] and tc.on_nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss ({m['loss']}) or gradient norm ({m['grad_norm']}) at "
                        f"step {step}; the last good checkpoint in {ckpt.directory} is kept. "
                        "Lower optimizer.learning_rate, raise optimizer.warmup_steps, or set "
                        "train.on_nonfinite=skip."
                    )
                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.perf_counter()
                    tps = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, step
                    m["tokens_per_second"] = tps
                    util = mfu(tps, flops, jax.device_count(), peak)
                    if util is not None:
                        m["mfu"] = util
                    writer.write(step, {f"train/{k}": v for k, v in m.items()})
                    progress.update(step, m)
                if tc.eval_every and (step % tc.eval_every == 0 or step == tc.steps):
                    batches = data.eval_batches(mesh, tc.eval_batches)
                    ev = evaluate(trainer, state.params, batches, spec.main_loss)
                    if ev:
                        eval_losses[step] = ev["loss"]
                        writer.write(step, {f"eval/{k}": v for k, v in ev.items()})
                        progress.write(
                            f"step {step}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in ev.items())
                        )
                if ckpt.should_save(step) or step == tc.steps or stop.signal is not None:
                    ckpt.save(
                        step,
                        state,
                        data_state=train_iter.get_state(),
                        config=resolved,
                        tokenizer_dir=str(data.tokenizer_dir),
                        force=True,
                    )
                if stop.signal is not None:
                    progress.write(f"received signal {stop.signal}: saved step {step}, exiting")
                    break
                batch = next(train_iter)
    finally:
        progress.close()
        ckpt.wait_until_finished()
        ckpt.close()
        writer.close()
    result = RunResult(
        workdir=workdir,
        final_step=step,
        losses=losses,
        eval_losses=eval_losses,
        checkpoint_dir=workdir / "checkpoints",
        metrics_path=writer.jsonl_path,
        loss_curve=writer.loss_curve_path,
    )
    if is_main:
        print(
            f"checkpoints: {result.checkpoint_dir}\nmetrics: {result.metrics_path} "
            f"(TensorBoard: {workdir / 'tensorboard'})\nloss curve: {result.loss_curve}"
        )
    return result


def _memory_line(mem) -> str:
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    parts = []
    for f in fields:
        v = getattr(mem, f, None)
        if v is not None:
            parts.append(f"{f.replace('_size_in_bytes', '')}={v / 2**20:.1f} MiB")
    return ", ".join(parts) or str(mem)
