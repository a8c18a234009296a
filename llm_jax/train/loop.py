"""The training loop behind `llm-jax train`: data, sharded steps, evaluation, metrics,
checkpoints with exact resume, clean shutdown on SIGTERM/SIGINT.

`train(cfg)` is `setup(cfg)` (everything before the first step, returned as a `Run`), a
short step loop, and the periodic actions of `llm_jax.train.hooks`. A run stopped by
SIGTERM/SIGINT saves its step and reports the signal in `RunResult.interrupted`; the CLI
exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from llm_jax.checkpoint import CheckpointManager
from llm_jax.data.iterator import DataIterator
from llm_jax.data.objectives import objective_spec
from llm_jax.finetune.base import Base
from llm_jax.finetune.setup import FinetunePlan, check_tokenizer, prepare_finetune, read_base
from llm_jax.models.config import ModelConfig
from llm_jax.parallel.mesh import describe, initialize_distributed, make_mesh
from llm_jax.parallel.rules import activation_sharding
from llm_jax.train import data as train_data
from llm_jax.train import task_eval
from llm_jax.train.allocator import allocator_hint
from llm_jax.train.compile import (
    CompiledSteps,
    StateLayout,
    check_batch_size,
    compile_steps,
    state_layout,
)
from llm_jax.train.config import RunConfig
from llm_jax.train.flops import flops_and_tokens, peak_flops_per_device, teacher_flops_per_token
from llm_jax.train.hooks import (
    CheckpointEvery,
    EvalEvery,
    LogEvery,
    NonFinite,
    NonFiniteLossError,
    StopOnSignal,
    evaluate,
)
from llm_jax.train.metrics import MetricsWriter, Progress, Throughput
from llm_jax.train.step import LossConfig, TrainState

if TYPE_CHECKING:
    from llm_jax.compress.distill import Teacher

__all__ = ["NonFiniteLossError", "Run", "RunResult", "evaluate", "setup", "train"]


@dataclasses.dataclass
class RunResult:
    """What `train` returns: where the run is, how far it got, and its losses by step."""

    workdir: Path
    final_step: int
    losses: dict[int, float]  # train loss per step run in this process
    eval_losses: dict[int, float]
    checkpoint_dir: Path
    metrics_path: Path
    loss_curve: Path
    interrupted: int | None = None  # the signal (SIGTERM/SIGINT) that stopped the run


@dataclasses.dataclass
class Run:
    """One training run between set-up and teardown: what the loop and hooks share.

    `state`, `step`, `batch` and the loss records change as the loop runs; a context
    manager that finishes the in-flight checkpoint and closes the writers on exit.
    """

    cfg: RunConfig
    workdir: Path
    data: train_data.PreparedData
    resolved: dict[str, Any]  # the run config with the model section filled in
    layout: StateLayout
    ckpt: CheckpointManager
    batches: DataIterator
    writer: MetricsWriter
    progress: Progress
    state: TrainState
    start: int
    steps: CompiledSteps | None = None  # None when there is nothing left to train
    batch: dict[str, jax.Array] | None = None
    hooks: list[Any] = dataclasses.field(default_factory=list)
    step: int = 0
    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    eval_losses: dict[int, float] = dataclasses.field(default_factory=dict)

    def eval_batches(self) -> list[dict[str, jax.Array]]:
        return self.data.eval_batches(self.layout.mesh, self.cfg.train.eval_batches)

    def result(self, interrupted: int | None = None) -> RunResult:
        return RunResult(
            workdir=self.workdir,
            final_step=self.step,
            losses=self.losses,
            eval_losses=self.eval_losses,
            checkpoint_dir=self.workdir / "checkpoints",
            metrics_path=self.writer.jsonl_path,
            loss_curve=self.writer.loss_curve_path,
            interrupted=interrupted,
        )

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.progress.close()
        self.ckpt.wait_until_finished()
        self.ckpt.close()
        self.writer.close()


def _to_float(metrics: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(cfg: RunConfig, callbacks: Sequence[Callable[[Run, int, dict], None]] = ()) -> RunResult:
    """Run (or resume) the training job described by `cfg`. See the module docstring.

    `callbacks` run after each step, after the run's own hooks, as
    `callback(run, step, metrics)` with the step's metrics as floats (e.g.
    `llm_jax.notebook.LiveLossPlot` redraws a loss curve in a notebook).

    Raises:
      hooks.Interrupted: SIGTERM/SIGINT arrived during set-up (nothing was saved).
      NonFiniteLossError: a non-finite step with `train.on_nonfinite=stop`.
    """
    with StopOnSignal() as stop, setup(cfg, stop) as run:
        stop.defer()
        for step in range(run.start + 1, cfg.train.steps + 1):
            run.state, metrics = run.steps.train(run.state, run.batch)
            run.step, m = step, _to_float(metrics)
            run.losses[step] = m["loss"]
            for hook in (*run.hooks, *callbacks):
                hook(run, step, m)
            if stop.signal is not None:
                break
            run.batch = next(run.batches)
        task_eval.final_evaluation(run, run.state.params, interrupted=stop.signal)
    result = run.result(stop.signal)
    if jax.process_index() == 0:
        print(
            f"checkpoints: {result.checkpoint_dir}\nmetrics: {result.metrics_path} "
            f"(TensorBoard: {run.workdir / 'tensorboard'})\nloss curve: {result.loss_curve}"
        )
    return result


def setup(cfg: RunConfig, stop: StopOnSignal) -> Run:
    """Everything before the first step: data, mesh, state (restored or fresh), compiled
    steps and hooks. Whatever can fail on bad input fails before any compilation."""
    initialize_distributed(**dataclasses.asdict(cfg.distributed))
    workdir, tc, is_main = Path(cfg.workdir).absolute(), cfg.train, jax.process_index() == 0
    base = read_base(cfg) if cfg.init.source else None
    data = train_data.prepare(cfg.data, workdir, base_tokenizer=base and base.tokenizer_dir)
    model_config, plan = _model_and_plan(cfg, data, base, workdir)
    mesh = make_mesh(cfg.mesh)
    check_batch_size(cfg.data.batch_size, mesh, tc.grad_accum_steps)
    layout = state_layout(
        model_config,
        cfg.optimizer,
        mesh,
        total_steps=tc.steps,
        rules=cfg.mesh.rules,
        seed=tc.seed,
        partition=plan and plan.partition,
        prune=cfg.prune,
    )
    teacher = _teacher(cfg, model_config, mesh, layout.rules, workdir)
    resolved = {**cfg.to_dict(), "model": model_config.to_dict()}
    if plan is not None:
        resolved["init"] = plan.reference()
    if teacher is not None:
        resolved["teacher"] = teacher.reference
    ckpt = CheckpointManager(
        workdir / "checkpoints",
        save_interval_steps=tc.checkpoint_every,
        max_to_keep=tc.keep_checkpoints,
        async_save=tc.async_checkpoint,
    )
    batches = data.train_iterator(mesh)
    with activation_sharding(mesh, layout.rules):
        state, start, frozen = _restore_or_init(
            layout, ckpt, batches, is_main, plan, _student_start(cfg, model_config, teacher)
        )
        run = Run(
            cfg=cfg,
            workdir=workdir,
            data=data,
            resolved=resolved,
            layout=layout,
            ckpt=ckpt,
            batches=batches,
            writer=MetricsWriter(workdir, enabled=is_main, resume_step=start),
            progress=Progress(tc.steps, initial_step=start, enabled=is_main and tc.progress),
            state=state,
            start=start,
            step=start,
        )
        if start >= tc.steps:
            if is_main:
                print(
                    f"{ckpt.directory} is already at step {start}, train.steps={tc.steps}: "
                    "nothing to train; raise train.steps to continue.",
                    file=sys.stderr,
                )
            return run
        run.batch = next(batches)
        run.steps = compile_steps(
            layout,
            cfg.data.objective,
            run.batch,
            loss=LossConfig(label_smoothing=tc.label_smoothing, z_loss=tc.z_loss),
            grad_accum_steps=tc.grad_accum_steps,
            skip_nonfinite=tc.on_nonfinite == "skip",
            frozen=frozen,
            teacher=teacher,
        )
    if is_main:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2))
        _print_banner(cfg, mesh, run.steps.memory, [] if plan is None else plan.banner(layout))
    run.hooks = _hooks(cfg, model_config, run.batch, stop, teacher and teacher.config)
    return run


def _model_and_plan(
    cfg: RunConfig, data: train_data.PreparedData, base: Base | None, workdir: Path
) -> tuple[ModelConfig, FinetunePlan | None]:
    """The model config; for a fine-tuning run also its plan (base, partition, start)."""
    if base is None:
        return _model_config(cfg, data.tokenizer.vocab_size), None
    check_tokenizer(data.tokenizer.vocab_size, base.config, data.config.tokenizer_path)
    plan = prepare_finetune(
        cfg, base=base, tokenizer=data.tokenizer, labels=train_data.labels(data), workdir=workdir
    )
    return plan.model_config, plan


def _model_config(cfg: RunConfig, tokenizer_vocab: int):
    model_config = cfg.model_config(tokenizer_vocab)
    if tokenizer_vocab > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} ids but model.vocab_size is "
            f"{model_config.vocab_size}; remove model.vocab_size to take the tokenizer's, or "
            f"train a tokenizer with data.vocab_size <= {model_config.vocab_size}."
        )
    return model_config


def _teacher(
    cfg: RunConfig, model_config: ModelConfig, mesh, rules, workdir: Path
) -> Teacher | None:
    """The distillation teacher `train.teacher` names, read, checked and placed; a resumed
    run checks it is the teacher its config.json recorded (`resolved["teacher"]`)."""
    saved = workdir / "config.json"
    recorded = json.loads(saved.read_text()).get("teacher") if saved.is_file() else None
    if not cfg.train.teacher:
        if isinstance(recorded, dict):  # resuming a distillation as plain training
            source = recorded.get("from_checkpoint") or recorded.get("from_hf")
            raise ValueError(
                f"the run in {workdir} distils from {source}; set train.teacher={source} to "
                "resume it, or use a new workdir for a run without a teacher."
            )
        return None
    from llm_jax.compress.distill import prepare_teacher

    teacher = prepare_teacher(
        cfg.train, model_config, cfg.data.objective, mesh, rules, recorded=recorded
    )
    print(f"distilling from {cfg.train.teacher}", file=sys.stderr)
    return teacher


def _student_start(cfg: RunConfig, model_config: ModelConfig, teacher: Teacher | None):
    """() -> the student's starting parameters taken from the teacher's layers
    (train.distill_init=alternate), or None."""
    if teacher is None or cfg.train.distill_init == "none":
        return None
    if cfg.init.source:
        raise ValueError("train.distill_init=alternate and init.from_* both start the model.")
    from flax import nnx

    from llm_jax.compress.distill import layers_from_teacher
    from llm_jax.models import build

    def start():
        model = build(model_config, rngs=nnx.Rngs(cfg.train.seed))
        fresh = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return layers_from_teacher(model_config, teacher.config, teacher.host_params, fresh)

    return start


def _restore_or_init(
    layout: StateLayout,
    ckpt: CheckpointManager,
    batches: DataIterator,
    is_main: bool,
    plan: FinetunePlan | None,
    start_params=None,
) -> tuple[TrainState, int, dict[str, Any]]:
    """(state, step, frozen params): the latest good checkpoint (with the data position),
    else fresh (from the base for a fine-tuning run, or from `start_params()` when given).
    The frozen part of a fine-tuning run always comes from its base: checkpoints hold only
    what trains."""
    trainable, frozen = (None, {}) if plan is None else layout.split(plan.start.params)
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(layout.abstract_state)
        batches.set_state(restored.data_state)
        if is_main:
            print(f"resuming from step {restored.step} in {ckpt.directory}", file=sys.stderr)
        return restored.state, restored.step, frozen
    if ckpt.all_steps() and is_main:
        print(
            f"no checkpoint in {ckpt.directory} passes verification (steps "
            f"{ckpt.all_steps()}, see the warnings above): starting again from step 0.",
            file=sys.stderr,
        )
    if plan is None and start_params is not None:
        return layout.init_from(start_params()), 0, frozen
    if plan is None:
        return layout.init(), 0, frozen
    return layout.init_from(trainable), 0, frozen


def _hooks(
    cfg: RunConfig, model_config, batch, stop: StopOnSignal, teacher: ModelConfig | None
) -> list[Any]:
    """The periodic actions, in order: the non-finite check first (so nothing of a bad
    step is logged or saved), then logging, evaluation and checkpointing. A distillation
    teacher's forward counts towards MFU (`Throughput`'s "mfu" and "teacher_mfu")."""
    tc = cfg.train
    spec = objective_spec(cfg.data.objective)
    flops, tokens_per_step = flops_and_tokens(model_config, spec, batch)
    throughput = Throughput(
        skip_steps=0,
        flops_per_token=flops,
        num_devices=jax.device_count(),
        peak_flops_per_device=peak_flops_per_device(),
        teacher_flops_per_token=teacher_flops_per_token(teacher, spec, batch) if teacher else 0.0,
    )
    hooks: list[Any] = [
        NonFinite(tc.on_nonfinite),
        LogEvery(tc.log_every, tc.steps, tokens_per_step, throughput),
    ]
    if tc.eval_every:
        hooks.append(EvalEvery(tc.eval_every, tc.steps, throughput, spec.main_loss))
    hooks.append(CheckpointEvery(tc.steps, stop, throughput))
    return hooks


def _print_banner(cfg: RunConfig, mesh, mem, finetune_lines: list[str]) -> None:
    for line in finetune_lines:
        print(line, file=sys.stderr)
    print(f"mesh: {describe(mesh)}; rules: {cfg.mesh.rules}", file=sys.stderr)
    if mem is not None:
        print(f"compiled step memory: {_memory_line(mem)}", file=sys.stderr)
        hint = allocator_hint(jax.default_backend(), mem.temp_size_in_bytes)
        if hint:
            print(hint, file=sys.stderr)


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
