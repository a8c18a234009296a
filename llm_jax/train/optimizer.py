"""Optimizers and learning-rate schedules from config, with optax."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import optax

from llm_jax.config import Config, at_least, one_of

OPTIMIZERS = ("adamw", "adafactor", "sgd", "lion")
SCHEDULES = ("cosine", "linear", "inverse_sqrt", "constant")
# Axes that do not count towards a parameter's rank for weight decay: the stacked-layer
# axis, and the head dim "kv" (a [heads, kv] attention bias is one vector, split per head).
NOT_WEIGHT_AXES = ("layers", "kv")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig(Config):
    """Optimizer, schedule and clipping. `learning_rate` is the peak after warmup."""

    section: ClassVar[str] = "optimizer"

    name: str = "adamw"
    learning_rate: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 100
    end_learning_rate_ratio: float = 0.1  # cosine/linear decay to peak * ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9  # sgd
    clip_grad_norm: float = 1.0  # 0 disables

    def __post_init__(self) -> None:
        one_of(self, "name", OPTIMIZERS)
        one_of(self, "schedule", SCHEDULES)
        at_least(self, "learning_rate", 0, strict=True)
        at_least(self, "warmup_steps", 0)
        at_least(self, "clip_grad_norm", 0, note="0 disables")
        at_least(self, "weight_decay", 0)


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then the configured decay."""
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    end = peak * cfg.end_learning_rate_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_learning_rate_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.schedule == "inverse_sqrt":
        # peak * sqrt(warmup / step) after warmup (Vaswani et al. 2017, T5).
        def decay(step):
            return peak * jax.lax.rsqrt((step + max(warmup, 1)) / max(warmup, 1))
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(axes_tree: Any) -> Any:
    """True for parameters that get weight decay: matrices (kernels, embeddings, tables),
    not vectors (biases, norm scales).

    Args:
      axes_tree: the logical axis names of every parameter (a tuple per leaf, e.g.
        `llm_jax.parallel.logical_axes(model)`).

    Returns:
      A tree shaped like the parameters: True iff a parameter has >= 2 logical axes
      besides "layers" and the head dim "kv" (`NOT_WEIGHT_AXES`).
    """
    return jax.tree.map(
        lambda axes: sum(a not in NOT_WEIGHT_AXES for a in axes) >= 2,
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, axes_tree: Any
) -> optax.GradientTransformation:
    """The optax chain: optional global-norm clipping, then the optimizer with its schedule.

    `axes_tree` holds the parameters' logical axes; it decides which get weight decay
    (`decay_mask`).
    """
    lr = make_schedule(cfg, total_steps)
    mask = decay_mask(axes_tree)
    if cfg.name == "adamw":
        opt = optax.adamw(
            lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    elif cfg.name == "adafactor":
        opt = optax.adafactor(
            lr, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask
        )
    elif cfg.name == "lion":
        opt = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    else:
        opt = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay, mask=mask),
            optax.sgd(lr, momentum=cfg.momentum),
        )
    if cfg.clip_grad_norm:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_grad_norm), opt)
    return opt
