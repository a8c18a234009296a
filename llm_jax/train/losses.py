"""The model-facing half of each objective: its named (sum, count) losses.

`LOSSES[spec.name](model, batch, dropout_rng, loss_config)` returns `{loss name: (sum,
count)}`; each loss is weighted by the batch array `spec.loss_weights` names for it (see
`llm_jax.data.objectives`), which is also where the train step takes its counts from, so
the two always agree. Keeping sums and counts apart lets gradient accumulation and any
number of devices reduce exactly.

Shape letters: B batch, T length, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from llm_jax import ops

if TYPE_CHECKING:
    from llm_jax.data.objectives import ObjectiveSpec

Batch = dict[str, jax.Array]
Losses = dict[str, tuple[jax.Array, jax.Array]]
LossFn = Callable[[Any, Batch, "jax.Array | None", "LossConfig"], Losses]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """How the token losses are shaped: label smoothing (PyTorch convention) and the
    z-loss coefficient on log Z^2."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0


def _ce(logits, labels, weights, lc: LossConfig):
    return ops.cross_entropy(
        logits, labels, weights, label_smoothing=lc.label_smoothing, z_loss=lc.z_loss
    )


def clm_losses(model, batch: Batch, rng, lc: LossConfig) -> Losses:
    """ "lm": next-token cross-entropy over `weights` [B, T]."""
    logits = model(
        batch["tokens"],
        positions=batch.get("positions"),
        segment_ids=batch.get("segment_ids"),
        dropout_rng=rng,
    )
    return {"lm": _ce(logits, batch["targets"], batch["weights"], lc)}


def mlm_losses(model, batch: Batch, rng, lc: LossConfig) -> Losses:
    """ "mlm" over the selected tokens (`weights` [B, T]); "nsp" over the rows of
    `nsp_weights` [B] when the batch holds sentence-pair labels and the model an NSP head."""
    mlm, nsp = model.pretraining_logits(
        batch["tokens"],
        token_type_ids=batch.get("token_type_ids"),
        segment_ids=batch.get("segment_ids"),
        positions=batch.get("positions"),
        dropout_rng=rng,
    )
    losses = {"mlm": _ce(mlm, batch["targets"], batch["weights"], lc)}
    if nsp is not None and "nsp_labels" in batch:
        if "nsp_weights" not in batch:
            raise ValueError(
                "the batch has nsp_labels but no nsp_weights [B] (1 on real rows, 0 on "
                "padding rows); add them, as llm_jax.data's NSP/SOP source does."
            )
        losses["nsp"] = ops.cross_entropy(nsp, batch["nsp_labels"], batch["nsp_weights"])
    return losses


def seq2seq_losses(model, batch: Batch, rng, lc: LossConfig) -> Losses:
    """ "lm": decoder cross-entropy over `decoder_weights` [B, S]."""
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


def classification_logits(model, batch: Batch, rng=None) -> jax.Array:
    """Class logits [B, C] of a classification batch (the loss and the eval metrics share
    this one call)."""
    return model.classify(
        batch["tokens"],
        token_type_ids=batch.get("token_type_ids"),
        segment_ids=batch.get("segment_ids"),
        positions=batch.get("positions"),
        dropout_rng=rng,
    )


def classification_losses(model, batch: Batch, rng, lc: LossConfig) -> Losses:
    """ "cls": label cross-entropy over the rows of `label_weights` [B]."""
    logits = classification_logits(model, batch, rng)
    return {"cls": _ce(logits, batch["labels"], batch["label_weights"], lc)}


LOSSES: dict[str, LossFn] = {
    "clm": clm_losses,
    "mlm": mlm_losses,
    "span_corruption": seq2seq_losses,
    "seq2seq": seq2seq_losses,
    "classification": classification_losses,
    "instruct": clm_losses,  # a clm batch whose weights cover the responses only
}


def loss_counts(spec: ObjectiveSpec, batch: Batch) -> dict[str, jax.Array]:
    """{loss name: [] sum of its weight array}: the count each loss's sum is divided by.

    A loss whose weight array the batch lacks is left out (mlm's "nsp" without a pair
    task); the main loss's array is required.
    """
    main = spec.loss_weights[spec.main_loss]
    if main not in batch:
        raise ValueError(
            f"objective {spec.name!r} weights its {spec.main_loss!r} loss by batch[{main!r}], "
            f"which this batch lacks (it has {sorted(batch)}); build batches with "
            "llm_jax.data or add that array."
        )
    return {
        k: jnp.sum(batch[w].astype(jnp.float32)) for k, w in spec.loss_weights.items() if w in batch
    }
