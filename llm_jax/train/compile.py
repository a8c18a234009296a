"""Sharded training steps: abstract init -> shardings -> jitted init, train and eval steps.

`state_layout` derives the train state's shardings from the model's logical axes and the
mesh's rules (nothing is allocated); `compile_steps` adds the train step, compiled ahead of
time for one batch's shapes with the state donated, and the eval step. Both return frozen
records: there is no lazily filled cache. `pmap_train_step` is the same step as a
`jax.pmap` over local devices, for older notebook code (distillation included); it gives
the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.models import build
from llm_jax.models.config import ModelConfig
from llm_jax.parallel.mesh import (
    RULES,
    batch_sharding,
    data_parallel_size,
    logical_axes,
    logical_to_sharding,
)
from llm_jax.parallel.mesh import check_batch_size as check_data_shards
from llm_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from llm_jax.train.step import (
    Batch,
    LossConfig,
    TrainState,
    make_eval_step,
    make_train_step,
    new_train_state,
)

if TYPE_CHECKING:
    from llm_jax.compress.distill import Teacher
    from llm_jax.compress.prune import PruneConfig
    from llm_jax.finetune.partition import Partition


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """The train state of one model and optimizer on one mesh, before any allocation.

    Attributes:
      mesh: the ('data', 'fsdp', 'tensor') mesh.
      rules: logical axis -> mesh axis.
      graphdef: the model's static structure (`nnx.split`).
      tx: the optimizer.
      schedule: step -> learning rate.
      abstract_state: the `TrainState` as `jax.ShapeDtypeStruct`s carrying their shardings
        (a restore target).
      state_sharding: the `TrainState` of `NamedSharding`s.
      init: () -> a fresh `TrainState`, initialised directly into its shardings.
      partition: for fine-tuning, which parameters train (`llm_jax.finetune.Partition`);
        the state's `params` are then the trainable part only. None: all of them.
      abstract_frozen, frozen_sharding: the frozen part (a flat dict; {} without a
        partition) as ShapeDtypeStructs and NamedShardings.
      init_from: trainable params -> a `TrainState` starting from them (fresh optimizer
        state), in its shardings.
    """

    mesh: Mesh
    rules: dict[str, Any]
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: TrainState
    state_sharding: TrainState
    init: Callable[[], TrainState]
    partition: Partition | None = None
    abstract_frozen: dict[str, Any] = dataclasses.field(default_factory=dict)
    frozen_sharding: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_from: Callable[[Any], TrainState] | None = None

    def split(self, params: Any) -> tuple[Any, dict[str, Any]]:
        """Whole params -> (trainable, frozen), each put in its shardings."""
        trainable, frozen = (params, {}) if self.partition is None else self.partition.split(params)
        return (
            jax.device_put(trainable, self.state_sharding.params),
            jax.device_put(frozen, self.frozen_sharding),
        )

    def full_params(self, trainable: Any, frozen: dict[str, Any]) -> Any:
        """The whole parameter tree of the state's (trainable) params and the frozen part."""
        return trainable if self.partition is None else self.partition.combine(trainable, frozen)

    def put_batch(self, batch: dict[str, Any]) -> Batch:
        """Host arrays -> global arrays split on their leading axis over the batch axes."""
        return jax.device_put(
            batch, {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}
        )


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """A `StateLayout` with its compiled steps.

    Attributes:
      layout: the state's shardings and init.
      train: (state, batch) -> (state, metrics); compiled for the example batch's shapes,
        `state` donated (the frozen part of a fine-tuning run is bound in).
      eval: (params, batch) -> {loss name: (sum, count)}; `params` as in the state.
      frozen: the frozen parameters bound into both ({} when all train).
      memory: the compiled train step's `memory_analysis()` (None where unsupported).
    """

    layout: StateLayout
    train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval: Callable[[Any, Batch], dict[str, tuple[jax.Array, jax.Array]]]
    memory: Any
    frozen: dict[str, Any] = dataclasses.field(default_factory=dict)

    def full_params(self, params: Any) -> Any:
        """The whole parameter tree of a state's `params` (adds the frozen part)."""
        return self.layout.full_params(params, self.frozen)

    @property
    def abstract_state(self) -> TrainState:
        return self.layout.abstract_state

    @property
    def state_sharding(self) -> TrainState:
        return self.layout.state_sharding

    @property
    def init(self) -> Callable[[], TrainState]:
        return self.layout.init


def _state_sharding(tx, abstract_state: TrainState, param_sharding, mesh: Mesh) -> TrainState:
    replicated = NamedSharding(mesh, PartitionSpec())
    # Optimizer moments mirror the parameters they belong to; counters and factored
    # statistics (Adafactor's row/column moments) are replicated.
    opt_sharding = optax.tree_map_params(
        tx,
        lambda leaf, p, s: s if leaf.shape == p.shape else replicated,
        abstract_state.opt_state,
        abstract_state.params,
        param_sharding,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(
        step=replicated, params=param_sharding, opt_state=opt_sharding, rng=replicated
    )


def state_layout(
    model_config: ModelConfig,
    optimizer: OptimizerConfig,
    mesh: Mesh,
    *,
    total_steps: int,
    rules: str | dict[str, Any] = "dp",
    seed: int = 0,
    partition: Partition | None = None,
    prune: PruneConfig | None = None,
) -> StateLayout:
    """The shardings of the train state (abstract: nothing is allocated or compiled).

    Args:
      model_config: the architecture.
      optimizer: optimizer config; `total_steps` sets the schedule length.
      mesh: a ('data', 'fsdp', 'tensor') mesh.
      total_steps: the schedule's length.
      rules: a key of `llm_jax.parallel.RULES` (dp, fsdp, fsdp_tp) or a rules dict.
      seed: parameter initialisation and dropout seed.
      partition: which parameters train (fine-tuning); the optimizer sees only those.
      prune: gradual magnitude pruning (`llm_jax.compress.prune`); its masks join the
        optimizer state.
    """
    rules = RULES[rules] if isinstance(rules, str) else rules
    abstract_model = nnx.eval_shape(lambda: build(model_config, rngs=nnx.Rngs(0)))
    axes = logical_axes(abstract_model)
    frozen_axes: dict[str, Any] = {}
    if partition is not None:
        axes, frozen_axes = partition.split(axes, cut=lambda a, *_: a)
    tx = make_optimizer(optimizer, total_steps, axes)  # weight decay chosen by logical axes
    if prune is not None and prune.enabled:
        from llm_jax.compress.prune import magnitude_pruning

        tx = magnitude_pruning(tx, prune, total_steps, axes)

    def new_state(trainable) -> TrainState:
        return new_train_state(trainable, tx, seed)

    def init_fn() -> TrainState:
        params = nnx.to_pure_dict(nnx.state(build(model_config, rngs=nnx.Rngs(seed)), nnx.Param))
        return new_state(params if partition is None else partition.split(params)[0])

    abstract = jax.eval_shape(init_fn)
    param_sharding = logical_to_sharding(abstract.params, axes, mesh, rules)
    sharding = _state_sharding(tx, abstract, param_sharding, mesh)
    abstract_frozen: dict[str, Any] = {}
    if partition is not None:
        whole = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
        abstract_frozen = jax.eval_shape(lambda p: partition.split(p)[1], whole)
    frozen_sharding = logical_to_sharding(abstract_frozen, frozen_axes, mesh, rules)
    return StateLayout(
        mesh=mesh,
        rules=rules,
        graphdef=nnx.split(abstract_model)[0],
        tx=tx,
        schedule=make_schedule(optimizer, total_steps),
        abstract_state=jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, sharding
        ),
        state_sharding=sharding,
        init=jax.jit(init_fn, out_shardings=sharding),
        partition=partition,
        abstract_frozen=jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_frozen,
            frozen_sharding,
        ),
        frozen_sharding=frozen_sharding,
        init_from=jax.jit(new_state, in_shardings=(sharding.params,), out_shardings=sharding),
    )


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
    """Raises ValueError (naming a fix) unless the global batch splits over the mesh's
    data-parallel shards (`parallel.mesh.check_batch_size`) and into `grad_accum_steps`
    micro-batches."""
    check_data_shards(batch_size, mesh)
    dp = data_parallel_size(mesh)
    if (batch_size // dp) % grad_accum_steps and batch_size % grad_accum_steps:
        raise ValueError(
            f"batch size {batch_size} is not divisible by grad_accum_steps={grad_accum_steps}; "
            "make data.batch_size a multiple of train.grad_accum_steps."
        )


def _dtype(x: Any) -> np.dtype:
    """The dtype of an array or `jax.ShapeDtypeStruct` (a plan compiles without data)."""
    return x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype


def compile_steps(
    layout: StateLayout,
    objective: str,
    example_batch: dict[str, Any],
    *,
    loss: LossConfig | None = None,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = False,
    frozen: dict[str, Any] | None = None,
    teacher: Teacher | None = None,
) -> CompiledSteps:
    """Lower and compile the train step for `example_batch`'s shapes; jit the eval step.

    Args:
      layout: from `state_layout`.
      objective: clm | mlm | span_corruption | seq2seq | classification | ...
      example_batch: a batch (host or global arrays, or `jax.ShapeDtypeStruct`s) of the
        shapes every train batch has.
      loss: label smoothing and z-loss (default: neither).
      grad_accum_steps: micro-batches per step.
      skip_nonfinite: leave the state unchanged on a non-finite loss or gradient norm.
      frozen: the frozen parameters of a layout with a partition (`StateLayout.split`).
      teacher: distil from this teacher (`llm_jax.compress.distill.prepare_teacher`); its
        parameters are bound into the train step as a non-donated argument.
    """
    check_batch_size(np.shape(next(iter(example_batch.values())))[0], layout.mesh, grad_accum_steps)
    frozen = frozen or {}
    if layout.partition is not None and not frozen and layout.abstract_frozen:
        raise ValueError("this layout freezes parameters: pass their values as `frozen`.")
    step_fn = make_train_step(
        layout.graphdef,
        layout.tx,
        objective,
        loss_config=loss or LossConfig(),
        grad_accum_steps=grad_accum_steps,
        skip_nonfinite=skip_nonfinite,
        learning_rate_fn=layout.schedule,
        partition=layout.partition,
        distill=None if teacher is None else teacher.distillation,
    )
    teacher_params = {} if teacher is None else teacher.params
    abstract_batch = {
        k: jax.ShapeDtypeStruct(
            np.shape(v), _dtype(v), sharding=batch_sharding(layout.mesh, np.ndim(v))
        )
        for k, v in example_batch.items()
    }
    shardings = {k: v.sharding for k, v in abstract_batch.items()}
    compiled = (
        jax.jit(
            step_fn,
            in_shardings=(
                layout.state_sharding,
                shardings,
                layout.frozen_sharding,
                {} if teacher is None else teacher.sharding,
            ),
            out_shardings=(layout.state_sharding, None),
            donate_argnums=0,  # the state only: the frozen part and the teacher are reused
        )
        .lower(
            layout.abstract_state,
            abstract_batch,
            layout.abstract_frozen,
            {} if teacher is None else teacher.abstract,
        )
        .compile()
    )
    # One leading-axis spec is a prefix of every batch leaf, whatever its rank.
    eval_step = jax.jit(
        make_eval_step(layout.graphdef, objective, partition=layout.partition),
        in_shardings=(
            layout.state_sharding.params,
            batch_sharding(layout.mesh, 1),
            layout.frozen_sharding,
        ),
    )
    return CompiledSteps(
        layout,
        lambda state, batch: compiled(state, batch, frozen, teacher_params),
        lambda params, batch: eval_step(params, batch, frozen),
        compiled.memory_analysis(),
        frozen,
    )


def pmap_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: str,
    *,
    teacher: Teacher | None = None,
    **step_kwargs: Any,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """The train step as a `jax.pmap` over local devices (the batch split on axis 0).

    State is replicated per device (`replicate`); batches are [num_devices, B /
    num_devices, ...]. Sums and gradients are psum-reduced, so the result equals the jit
    path. `step_kwargs` are those of `make_train_step` (e.g. `learning_rate_fn`). With a
    `teacher` (`llm_jax.compress.distill.prepare_teacher`) the step distils: the teacher's
    parameters are bound in and broadcast to every device (not replicated by the caller),
    and each device runs the teacher on its own shard of the batch.
    """
    if teacher is None:
        fn = make_train_step(graphdef, tx, objective, axis_name="batch", **step_kwargs)
        return jax.pmap(fn, axis_name="batch", donate_argnums=0)
    fn = make_train_step(
        graphdef, tx, objective, axis_name="batch", distill=teacher.distillation, **step_kwargs
    )
    mapped = jax.pmap(
        lambda state, batch, params: fn(state, batch, None, params),
        axis_name="batch",
        in_axes=(0, 0, None),
        donate_argnums=0,
    )
    return lambda state, batch: mapped(state, batch, teacher.params)


def replicate(tree: Any, devices: list[jax.Device] | None = None) -> Any:
    """Copy a pytree onto every local device for `pmap_train_step` (leading device axis)."""
    n = len(jax.local_devices() if devices is None else devices)
    return jax.tree.map(lambda x: jnp.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)
