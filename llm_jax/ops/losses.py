"""Losses and metrics over logits. Every loss returns (sum, count) so that it reduces
correctly across micro-batches and devices: mean = total_sum / total_count.

Shape letters: "..." any leading dims (e.g. B T), V vocabulary / number of classes.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from llm_jax.ops.softmax import log_softmax, logsumexp


def _weights(labels: Array, weights: Array | None) -> Array:
    if weights is None:
        return jnp.ones(labels.shape, jnp.float32)
    if weights.shape != labels.shape:
        raise ValueError(f"weights {weights.shape} must have the labels' shape {labels.shape}.")
    return weights.astype(jnp.float32)


def cross_entropy(
    logits: Float[Array, "... V"],
    labels: Int[Array, "..."],
    weights: Float[Array, "..."] | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Token cross-entropy with weights, label smoothing and z-loss, as (loss_sum, weight_sum).

    Per position, with p = softmax(logits), eps = label_smoothing:
        loss = -(1 - eps) log p[label] - eps * mean_v log p[v] + z_loss * logsumexp(logits)^2
    The smoothing matches PyTorch's `CrossEntropyLoss(label_smoothing=eps)`; the z-loss term
    is PaLM's auxiliary loss that keeps the softmax normaliser near 1.

    Args:
      logits: [..., V] in any float dtype; computed in float32.
      labels: integer targets in [0, V), shape [...].
      weights: per-position weights [...] (0 on padding); all ones when None.

    Returns:
      (sum over positions of weight * loss, sum of weights), both float32 scalars.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {logits.shape} and labels {labels.shape} disagree; logits must be "
            f"labels.shape + (V,)."
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
    w = _weights(labels, weights)
    x = logits.astype(jnp.float32)
    lse = logsumexp(x)  # [...]
    label_logit = jnp.take_along_axis(x, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = lse - label_logit
    if label_smoothing:
        smooth = lse - jnp.mean(x, axis=-1)  # -mean_v log p[v]
        nll = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    if z_loss:
        nll = nll + z_loss * jnp.square(lse)
    return jnp.sum(nll * w), jnp.sum(w)


def accuracy(
    logits: Float[Array, "... V"],
    labels: Int[Array, "..."],
    weights: Float[Array, "..."] | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Top-1 accuracy as (number correct weighted, sum of weights)."""
    w = _weights(labels, weights)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return jnp.sum(correct * w), jnp.sum(w)


def kl_divergence(
    p_logits: Float[Array, "... V"],
    q_logits: Float[Array, "... V"],
    weights: Float[Array, "..."] | None = None,
    *,
    temperature: float = 1.0,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """KL(p || q) per position between softmax(p_logits / T) and softmax(q_logits / T).

    For distillation p is the teacher and q the student (Hinton et al. 2015); multiply by
    T^2 yourself if you want their gradient scale. Returns (weighted sum, sum of weights).
    """
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits {p_logits.shape} and q_logits {q_logits.shape} differ.")
    log_p = log_softmax(p_logits.astype(jnp.float32) / temperature)
    log_q = log_softmax(q_logits.astype(jnp.float32) / temperature)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    w = _weights(kl, weights)
    return jnp.sum(kl * w), jnp.sum(w)
