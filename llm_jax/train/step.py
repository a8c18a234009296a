"""Train state and the pure, jit-able train and eval steps.

`train_step(state, batch) -> (state, metrics)` is a pure function of pytrees; the model is
`nnx.merge(graphdef, state.params)` inside it. Losses are kept as (sum, count) pairs so that
gradient accumulation and any number of devices give exactly the large-batch gradient:
each objective's loss is sum / count with the count taken over the whole global batch.

Shape letters: A accumulation steps, B batch, T length, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from llm_jax import ops

Batch = dict[str, jax.Array]
Losses = dict[str, tuple[jax.Array, jax.Array]]


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


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    label_smoothing: float = 0.0
    z_loss: float = 0.0


# Objectives ----------------------------------------------------------------------------------
# Each objective maps (model, batch, dropout_rng, loss config) to named (sum, count) losses;
# `counts` gives the same counts from the batch alone (for exact accumulation).


def _ce(logits, labels, weights, lc: LossConfig):
    return ops.cross_entropy(
        logits, labels, weights, label_smoothing=lc.label_smoothing, z_loss=lc.z_loss
    )


def _row_weights(batch: Batch) -> jax.Array:
    """[B] 1 for real rows, 0 for the empty rows that pad a last validation batch."""
    if "segment_ids" not in batch:
        return jnp.ones(batch["tokens"].shape[:1], jnp.float32)
    return (batch["segment_ids"][:, 0] > 0).astype(jnp.float32)


def clm_losses(model, batch: Batch, rng, lc: LossConfig) -> Losses:
    logits = model(
        batch["tokens"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        dropout_rng=rng,
    )
    return {"lm": _ce(logits, batch["targets"], batch["weights"], lc)}


def mlm_losses(model, batch: Batch, rng, lc: LossConfig) -> Losses:
    mlm, nsp = model.pretraining_logits(
        batch["tokens"],
        token_type_ids=batch.get("token_type_ids"),
        segment_ids=batch.get("segment_ids"),
        positions=batch.get("positions"),
        dropout_rng=rng,
    )
    losses = {"mlm": _ce(mlm, batch["targets"], batch["weights"], lc)}
    if nsp is not None and "nsp_labels" in batch:
        losses["nsp"] = ops.cross_entropy(nsp, batch["nsp_labels"], _row_weights(batch))
    return losses


def seq2seq_losses(model, batch: Batch, rng, lc: LossConfig) -> Losses:
    logits = model(
        batch["encoder_tokens"],
        batch["decoder_tokens"],
        encoder_segment_ids=batch.get("encoder_segment_ids"),
        decoder_segment_ids=batch.get("decoder_segment_ids"),
        encoder_positions=batch.get("encoder_positions"),
        decoder_positions=batch.get("decoder_positions"),
        dropout_rng=rng,
    )
    return {"lm": _ce(logits, batch["decoder_targets"], batch["decoder_weights"], lc)}


def classification_losses(model, batch: Batch, rng, lc: LossConfig) -> Losses:
    logits = model.classify(
        batch["tokens"],
        token_type_ids=batch.get("token_type_ids"),
        segment_ids=batch.get("segment_ids"),
        positions=batch.get("positions"),
        dropout_rng=rng,
    )
    return {"cls": _ce(logits, batch["labels"], _row_weights(batch), lc)}


def _weight_count(key: str, name: str):
    return lambda batch: {name: jnp.sum(batch[key].astype(jnp.float32))}


def _mlm_counts(batch: Batch) -> dict[str, jax.Array]:
    counts = {"mlm": jnp.sum(batch["weights"].astype(jnp.float32))}
    if "nsp_labels" in batch:
        counts["nsp"] = jnp.sum(_row_weights(batch))
    return counts


@dataclasses.dataclass(frozen=True)
class Objective:
    """A training objective: its (sum, count) losses, and the counts from the batch alone."""

    losses: Callable[..., Losses]
    counts: Callable[[Batch], dict[str, jax.Array]]


OBJECTIVES: dict[str, Objective] = {
    "clm": Objective(clm_losses, _weight_count("weights", "lm")),
    "mlm": Objective(mlm_losses, _mlm_counts),
    "span_corruption": Objective(seq2seq_losses, _weight_count("decoder_weights", "lm")),
    "seq2seq": Objective(seq2seq_losses, _weight_count("decoder_weights", "lm")),
    "classification": Objective(
        classification_losses,
        lambda batch: {"cls": jnp.sum(_row_weights(batch))},
    ),
}


def objective_for(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}.")
    return OBJECTIVES[name]


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


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: str,
    *,
    loss_config: LossConfig = LossConfig(),
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = False,
    learning_rate_fn: Callable | None = None,
    axis_name: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build `train_step(state, batch) -> (state, metrics)`.

    Args:
      graphdef: the model structure from `nnx.split(model)`.
      tx: the optax optimizer.
      objective: a key of OBJECTIVES.
      grad_accum_steps: split the batch into this many micro-batches, scanned.
      skip_nonfinite: keep the old parameters when the loss or gradient is not finite
        (else the update is applied and the loop stops on the reported `finite=0`).
      learning_rate_fn: the schedule, to report the learning rate.
      axis_name: set for the pmap path: sums and gradients are psum-reduced over it.
    """
    obj = objective_for(objective)

    def psum(x):
        return x if axis_name is None else jax.lax.psum(x, axis_name)

    def train_step(state: TrainState, batch: Batch):
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))
        counts = psum(obj.counts(batch))

        def loss_fn(params, micro: Batch, micro_rng):
            model = nnx.merge(graphdef, params)
            losses = obj.losses(model, micro, micro_rng, loss_config)
            total = sum(s / jnp.maximum(counts[k], 1.0) for k, (s, _) in losses.items())
            return total, losses

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if grad_accum_steps == 1:
            (loss, losses), grads = grad_fn(state.params, batch, step_rng)
        else:
            micro = _split_micro(batch, grad_accum_steps)
            rngs = jax.random.split(step_rng, grad_accum_steps)

            def body(acc, xs):
                (loss, losses), grads = grad_fn(state.params, *xs)
                return jax.tree.map(jnp.add, acc, (loss, losses, grads)), None

            zero = jax.eval_shape(
                grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rngs[0]
            )
            zero = jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), (zero[0][0], zero[0][1], zero[1])
            )
            (loss, losses, grads), _ = jax.lax.scan(body, zero, (micro, rngs))
        loss, grads = psum(loss), psum(grads)
        losses = psum(losses)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if skip_nonfinite:
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
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
    graphdef: nnx.GraphDef, objective: str, *, axis_name: str | None = None
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """Build `eval_step(params, batch) -> {name: (sum, count)}`; no dropout, no smoothing."""
    obj = objective_for(objective)

    def eval_step(params, batch: Batch):
        model = nnx.merge(graphdef, params)
        losses = obj.losses(model, batch, None, LossConfig())
        return losses if axis_name is None else jax.lax.psum(losses, axis_name)

    return eval_step


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int):
    """(graphdef, TrainState) for a freshly built model."""
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    return graphdef, TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )
