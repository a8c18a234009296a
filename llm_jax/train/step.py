"""Train state and the pure, jit-able train and eval steps.

`train_step(state, batch) -> (state, metrics)` is a pure function of pytrees; the model is
`nnx.merge(graphdef, state.params)` inside it. Losses are kept as (sum, count) pairs so that
gradient accumulation and any number of devices give exactly the large-batch gradient:
each objective's loss is sum / count with the count taken over the whole global batch.

Shape letters: A accumulation steps, B batch, T length, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from llm_jax.data.objectives import objective_spec
from llm_jax.train.losses import LOSSES, Batch, LossConfig, loss_counts

if TYPE_CHECKING:
    from llm_jax.compress.distill import Distillation
    from llm_jax.finetune.partition import Partition


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    Fields:
      step: [] int32, optimizer steps taken.
      params: the model parameters as a pure dict (`nnx.to_pure_dict`).
      opt_state: the optax state of `params`.
      rng: [2] uint32 raw PRNG key data (raw so that checkpoints store plain arrays).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


# Steps ----------------------------------------------------------------------------------------


def _split_micro(batch: Batch, accum: int) -> Batch:
    """[B, ...] -> [A, B/A, ...]; rows are strided so each micro-batch spans all devices."""

    def split(x):
        if x.shape[0] % accum:
            raise ValueError(
                f"batch size {x.shape[0]} is not divisible by grad_accum_steps={accum}."
            )
        return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _loss_and_grads(grad_fn: Callable, params: Any, batch: Batch, rng: jax.Array, accum: int):
    """(loss, {name: (sum, count)}, grads) of `grad_fn` over the batch.

    With `accum` > 1 the batch is split into A micro-batches (see `_split_micro`), each with
    its own dropout key, scanned, and the three results summed: the counts in `grad_fn` are
    those of the whole batch, so the sums add up to the large-batch values.
    """
    if accum == 1:
        (loss, losses), grads = grad_fn(params, batch, rng)
        return loss, losses, grads
    micro = _split_micro(batch, accum)
    rngs = jax.random.split(rng, accum)

    def body(acc, xs):
        (loss, losses), grads = grad_fn(params, *xs)
        return jax.tree.map(jnp.add, acc, (loss, losses, grads)), None

    zero = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rngs[0])
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero[0][0], zero[0][1], zero[1]))
    (loss, losses, grads), _ = jax.lax.scan(body, zero, (micro, rngs))
    return loss, losses, grads


def _update(
    tx: optax.GradientTransformation,
    state: TrainState,
    grads: Any,
    finite: jax.Array | None,
) -> tuple[Any, Any]:
    """(params, opt_state) after one optimizer step; given `finite` [] bool, the old ones
    where it is False (a non-finite step is skipped)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if finite is not None:
        params, opt_state = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (params, opt_state),
            (state.params, state.opt_state),
        )
    return params, opt_state


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: str,
    *,
    loss_config: LossConfig | None = None,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = False,
    learning_rate_fn: Callable | None = None,
    axis_name: str | None = None,
    partition: Partition | None = None,
    distill: Distillation | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build `train_step(state, batch, frozen=None, teacher=None) -> (state, metrics)`.

    Args:
      graphdef: the model structure from `nnx.split(model)`.
      tx: the optax optimizer.
      objective: a key of `llm_jax.data.objectives.OBJECTIVES`; its spec names the weight
        array of each loss, whose sums over the whole batch are the counts.
      grad_accum_steps: split the batch into this many micro-batches, scanned.
      skip_nonfinite: keep the old parameters when the loss or gradient is not finite
        (else the update is applied and the loop stops on the reported `finite=0`).
      learning_rate_fn: the schedule, to report the learning rate.
      axis_name: set for the pmap path: sums and gradients are psum-reduced over it.
      partition: for fine-tuning, `state.params` is the trainable part only and the step
        takes the frozen part as `frozen` (`llm_jax.finetune.Partition`): gradients and
        optimizer state exist only for the trainable part.
      distill: distil from a teacher (`llm_jax.compress.distill`): the step takes the
        teacher's parameters as `teacher` (frozen, never differentiated) and the loss is
        the recipe's weighted sum of the label loss, the KL term and the hidden cosine.
    """
    spec = objective_spec(objective)
    losses_fn = LOSSES[spec.name]
    loss_config = loss_config or LossConfig()

    def psum(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def train_step(state: TrainState, batch: Batch, frozen: Any = None, teacher: Any = None):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        counts = loss_counts(spec, batch)
        counts = psum(counts if distill is None else distill.counts(counts, batch))

        def loss_fn(params, micro: Batch, micro_rng):
            if partition is not None:
                params = partition.combine(params, frozen)
            model = nnx.merge(graphdef, params)
            if distill is not None:  # the teacher runs on this micro-batch only
                losses = distill.losses(model, teacher, micro, micro_rng, loss_config)
                return distill.total(losses, counts), losses
            losses = losses_fn(model, micro, micro_rng, loss_config)
            total = sum(s / jnp.maximum(counts[k], 1.0) for k, (s, _) in losses.items())
            return total, losses

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        loss, losses, grads = _loss_and_grads(
            grad_fn, state.params, batch, step_rng, grad_accum_steps
        )
        loss, losses, grads = psum((loss, losses, grads))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = _update(tx, state, grads, finite if skip_nonfinite else None)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.int32)}
        metrics.update({f"{k}_loss": s / jnp.maximum(c, 1.0) for k, (s, c) in losses.items()})
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng)
        )
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef,
    objective: str,
    *,
    axis_name: str | None = None,
    partition: Partition | None = None,
) -> Callable[..., dict[str, jax.Array]]:
    """Build `eval_step(params, batch, frozen=None) -> {name: (sum, count)}`; no dropout, no
    smoothing. With a `partition`, `params` is the trainable part (see `make_train_step`)."""
    losses_fn = LOSSES[objective_spec(objective).name]

    def eval_step(params, batch: Batch, frozen: Any = None):
        if partition is not None:
            params = partition.combine(params, frozen)
        model = nnx.merge(graphdef, params)
        losses = losses_fn(model, batch, None, LossConfig())
        return losses if axis_name is None else jax.lax.psum(losses, axis_name)

    return eval_step


def new_train_state(params: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """A step-0 `TrainState` of `params` (a pure dict; for fine-tuning, the trainable part)
    with fresh optimizer state and the dropout key of `seed`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int):
    """(graphdef, TrainState) for a freshly built model."""
    graphdef, params = nnx.split(model)
    return graphdef, new_train_state(nnx.to_pure_dict(params), tx, seed)
