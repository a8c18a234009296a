"""Sharded training over a device mesh: abstract init -> shardings -> jitted init and step.

`Trainer` owns the compiled functions for one (model config, optimizer, mesh) triple: the
train state's shardings are derived from the model's logical axes and the mesh's rules; the
step is `jax.jit` with in/out shardings and the state donated. A `pmap` data-parallel
variant exists for older notebook code and gives the same numbers.
"""

from __future__ import annotations

import functools
from typing import Any

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
from llm_jax.train.optimizer import OptimizerConfig, make_optimizer, make_schedule
from llm_jax.train.step import (
    LossConfig,
    TrainState,
    init_train_state,
    make_eval_step,
    make_train_step,
)


class Trainer:
    """Compiled, sharded train/eval steps for one model on one mesh.

    Args:
      model_config: the architecture.
      optimizer: optimizer config; `total_steps` sets the schedule length.
      mesh: a ('data', 'fsdp', 'tensor') mesh.
      rules: a key of `llm_jax.parallel.RULES` (dp, fsdp, fsdp_tp) or a rules dict.
      objective: clm | mlm | span_corruption | seq2seq | classification.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        optimizer: OptimizerConfig,
        mesh: Mesh,
        *,
        total_steps: int,
        objective: str,
        rules: str | dict = "dp",
        loss_config: LossConfig | None = None,
        grad_accum_steps: int = 1,
        skip_nonfinite: bool = False,
        seed: int = 0,
    ):
        self.model_config = model_config
        self.mesh = mesh
        self.rules = RULES[rules] if isinstance(rules, str) else rules
        self.objective = objective
        self.seed = seed
        self.schedule = make_schedule(optimizer, total_steps)
        self.grad_accum_steps = grad_accum_steps

        abstract = nnx.eval_shape(lambda: build(model_config, rngs=nnx.Rngs(0)))
        self.graphdef = nnx.split(abstract)[0]
        self.tx = make_optimizer(optimizer, total_steps, logical_axes(abstract))
        abstract_state = jax.eval_shape(self._init_fn)
        axes = logical_axes(abstract)
        param_sharding = logical_to_sharding(abstract_state.params, axes, mesh, self.rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        # Optimizer moments mirror the parameters they belong to; counters and factored
        # statistics (Adafactor's row/column moments) are replicated.
        opt_sharding = optax.tree_map_params(
            self.tx,
            lambda leaf, p, s: s if leaf.shape == p.shape else replicated,
            abstract_state.opt_state,
            abstract_state.params,
            param_sharding,
            transform_non_params=lambda _: replicated,
        )
        self.state_sharding = TrainState(
            step=replicated, params=param_sharding, opt_state=opt_sharding, rng=replicated
        )
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_state,
            self.state_sharding,
        )
        self._step_kwargs = dict(
            loss_config=loss_config or LossConfig(),
            grad_accum_steps=grad_accum_steps,
            skip_nonfinite=skip_nonfinite,
            learning_rate_fn=self.schedule,
        )
        self._step_fn = make_train_step(self.graphdef, self.tx, objective, **self._step_kwargs)
        self._eval_fn = make_eval_step(self.graphdef, objective)
        self._jit_step = None
        self._jit_eval = None

    def _init_fn(self) -> TrainState:
        model = build(self.model_config, rngs=nnx.Rngs(self.seed))
        return init_train_state(model, self.tx, self.seed)[1]

    # State -----------------------------------------------------------------------------------

    def init_state(self) -> TrainState:
        """A fresh train state, initialised directly into its shardings (no host copy)."""
        return jax.jit(self._init_fn, out_shardings=self.state_sharding)()

    def batch_sharding(self, batch: dict[str, Any]) -> dict[str, NamedSharding]:
        return {k: batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def check_batch_size(self, batch_size: int) -> None:
        dp = data_parallel_size(self.mesh)
        if batch_size % dp:
            raise ValueError(
                f"global batch size {batch_size} is not divisible by the {dp} data-parallel "
                f"shards of the mesh (data x fsdp); use a multiple of {dp}, e.g. "
                f"{max(dp, batch_size // dp * dp)} or {(batch_size // dp + 1) * dp}."
            )
        if (batch_size // dp) % self.grad_accum_steps and batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch size {batch_size} is not divisible by grad_accum_steps="
                f"{self.grad_accum_steps}."
            )

    # Steps -----------------------------------------------------------------------------------

    def compile_step(self, example_batch: dict[str, Any]):
        """Lower and compile the train step for this batch's shapes; returns the compiled
        executable (whose `memory_analysis()` the loop prints once)."""
        shardings = self.batch_sharding(example_batch)
        abstract_batch = {
            k: jax.ShapeDtypeStruct(np.shape(v), jnp.asarray(v).dtype, sharding=shardings[k])
            for k, v in example_batch.items()
        }
        jitted = jax.jit(
            self._step_fn,
            in_shardings=(self.state_sharding, shardings),
            out_shardings=(self.state_sharding, None),
            donate_argnums=0,
        )
        self._jit_step = jitted.lower(self.abstract_state, abstract_batch).compile()
        return self._jit_step

    def step(self, state: TrainState, batch: dict[str, jax.Array]):
        if self._jit_step is None:
            self.compile_step(batch)
        return self._jit_step(state, batch)

    def eval_losses(self, params, batch: dict[str, jax.Array]) -> dict[str, tuple]:
        if self._jit_eval is None:
            self._jit_eval = jax.jit(
                self._eval_fn, in_shardings=(self.state_sharding.params, self.batch_sharding(batch))
            )
        return self._jit_eval(params, batch)

    # pmap -------------------------------------------------------------------------------------

    @functools.cached_property
    def pmap_step(self):
        """The same train step as a `jax.pmap` over local devices (batch split on axis 0).

        State is replicated per device (`jax.device_put_replicated`); batches are
        [num_devices, B / num_devices, ...]. Sums and gradients are psum-reduced, so the
        result equals the jit path.
        """
        fn = make_train_step(
            self.graphdef, self.tx, self.objective, axis_name="batch", **self._step_kwargs
        )
        return jax.pmap(fn, axis_name="batch", donate_argnums=0)

    @staticmethod
    def replicate(tree, devices=None):
        """Copy a pytree onto every local device for `pmap_step` (leading device axis)."""
        devices = jax.local_devices() if devices is None else devices
        n = len(devices)
        return jax.tree.map(lambda x: jnp.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)
