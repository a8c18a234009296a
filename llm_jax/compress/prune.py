"""Unstructured magnitude pruning with the gradual schedule of Zhu & Gupta (2017).

    s_t = s_f + (s_i − s_f) (1 − (t − t0) / (n Δt))^3,   t ∈ {t0, t0 + Δt, ..., t0 + nΔt}

At each pruning step the smallest-magnitude weights are masked until the sparsity reaches
s_t, over all prunable weights together (`scope: global`) or per weight matrix, per layer
(`scope: layer`). Only matrices prune (kernels, embeddings: the parameters weight decay
applies to), never norms or biases. `magnitude_pruning` wraps any optax optimizer: the
masks live in its state (so they are checkpointed and restored with it), masked weights get
no gradient and are set to exactly zero by every update.

    prune: {sparsity: 0.8, start_step: 100, end_step: 800, frequency: 50}

Shape letters: L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax.config import Config, at_least, in_interval, one_of
from llm_jax.train.optimizer import decay_mask

SCOPES = ("global", "layer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig(Config):
    """The `prune:` section: gradual magnitude pruning during training.

    Attributes:
      sparsity: the final sparsity s_f of the prunable weights; 0 turns pruning off.
      initial_sparsity: s_i, reached at `start_step`.
      start_step: t0, the first pruning step.
      end_step: t0 + nΔt, the last; None: the run's last step (`train.steps`).
      frequency: Δt, optimizer steps between pruning steps.
      scope: `global` (one threshold over all prunable weights) or `layer` (each matrix of
        each layer pruned to s_t on its own).
    """

    section: ClassVar[str] = "prune"

    sparsity: float = 0.0
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    frequency: int = 100
    scope: str = "global"

    def __post_init__(self) -> None:
        in_interval(self, "sparsity", 0, 1, high_open=True)
        in_interval(self, "initial_sparsity", 0, 1, high_open=True)
        at_least(self, "start_step", 0)
        at_least(self, "frequency", 1)
        one_of(self, "scope", SCOPES)
        if self.initial_sparsity > self.sparsity:
            raise ValueError(
                f"prune.initial_sparsity={self.initial_sparsity} exceeds prune.sparsity="
                f"{self.sparsity}; the schedule only prunes more: lower initial_sparsity."
            )
        if self.end_step is not None and self.end_step < self.start_step:
            raise ValueError(
                f"prune.end_step={self.end_step} is before prune.start_step={self.start_step}; "
                "raise end_step (or leave it unset for the run's last step)."
            )

    @property
    def enabled(self) -> bool:
        return self.sparsity > 0

    def end(self, total_steps: int) -> int:
        return total_steps if self.end_step is None else self.end_step


def sparsity_schedule(cfg: PruneConfig, total_steps: int):
    """step -> the target sparsity of the latest pruning step at or before it (0 before
    `start_step`; s_f after the end). Works on Python ints and traced int32 steps."""
    start, end, freq = cfg.start_step, cfg.end(total_steps), cfg.frequency
    span = max(end - start, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.int32)
        t = jnp.minimum(start + (step - start) // freq * freq, end)
        progress = (t - start).astype(jnp.float32) / span
        s = cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - progress) ** 3
        return jnp.where(step < start, 0.0, s)

    return schedule


def keep_largest(magnitude: jax.Array, sparsity: jax.Array) -> jax.Array:
    """Bool mask of `magnitude`'s shape: False on its floor(sparsity · n) smallest entries
    (ties broken by position, stably), True elsewhere."""
    flat = magnitude.ravel()
    n = flat.size
    k = jnp.floor(jnp.asarray(sparsity, jnp.float32) * n).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    keep = jnp.zeros((n,), bool).at[order].set(jnp.arange(n) >= k)
    return keep.reshape(magnitude.shape)


def prunable_leaves(axes_tree: Any) -> Any:
    """Per parameter: None (never pruned), "whole" (one matrix) or "layers" (stacked
    [L, ...] matrices, pruned per layer under `scope: layer`)."""

    def kind(axes, is_matrix):
        if not is_matrix:
            return None
        return "layers" if axes and axes[0] == "layers" else "whole"

    return jax.tree.map(
        kind, axes_tree, decay_mask(axes_tree), is_leaf=lambda x: isinstance(x, tuple)
    )


def magnitude_masks(params: Any, sparsity: jax.Array, kinds: Any, scope: str) -> Any:
    """Bool masks (True = kept) of the `kinds` leaves (`prunable_leaves`) at `sparsity`;
    all True on the others.

    Args:
      params: the parameter tree.
      sparsity: [] the fraction of prunable weights to mask.
      kinds: `prunable_leaves` of the parameters' logical axes.
      scope: "global" (one threshold over all of them) or "layer".
    """
    leaves, treedef = jax.tree.flatten(params)
    kind_leaves = treedef.flatten_up_to(kinds)
    masks = [jnp.ones(p.shape, bool) for p in leaves]
    chosen = [i for i, k in enumerate(kind_leaves) if k is not None]
    if not chosen:
        return treedef.unflatten(masks)
    if scope == "global":
        flat = jnp.concatenate([jnp.abs(leaves[i]).astype(jnp.float32).ravel() for i in chosen])
        keep = keep_largest(flat, sparsity)
        offset = 0
        for i in chosen:
            size = leaves[i].size
            masks[i] = keep[offset : offset + size].reshape(leaves[i].shape)
            offset += size
    else:
        for i in chosen:
            mag = jnp.abs(leaves[i]).astype(jnp.float32)
            if kind_leaves[i] == "layers":
                masks[i] = jax.vmap(keep_largest, in_axes=(0, None))(mag, sparsity)
            else:
                masks[i] = keep_largest(mag, sparsity)
    return treedef.unflatten(masks)


class PruneState(NamedTuple):
    """The wrapped optimizer's state, the masks (True = kept; shaped like the params) and
    the optimizer-step count the schedule reads."""

    inner: Any
    masks: Any
    count: jax.Array


def magnitude_pruning(
    inner: optax.GradientTransformation, cfg: PruneConfig, total_steps: int, axes_tree: Any
) -> optax.GradientTransformation:
    """`inner` with gradual magnitude pruning (see the module docstring).

    Masked weights get zero gradients (so no moment or weight decay moves them) and an
    update of exactly −w, so that they are 0.0 after every step. At a pruning step the new
    masks are those of the updated weights, and a weight once pruned stays pruned.

    Args:
      inner: the optimizer.
      cfg: the schedule and scope.
      total_steps: the run's length (the schedule's end when `cfg.end_step` is None).
      axes_tree: the parameters' logical axes (which leaves prune, and their layer axis).
    """
    kinds = prunable_leaves(axes_tree)
    schedule = sparsity_schedule(cfg, total_steps)
    start, end = cfg.start_step, cfg.end(total_steps)

    def init(params):
        masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
        return PruneState(inner.init(params), masks, jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("magnitude_pruning needs the parameters: call update(g, s, params).")
        masks = state.masks
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), updates, masks)
        updates, inner_state = inner.update(grads, state.inner, params)
        step = state.count
        due = (step >= start) & (step <= end) & ((step - start) % cfg.frequency == 0)

        def prune():
            fresh = magnitude_masks(
                optax.apply_updates(params, updates), schedule(step), kinds, cfg.scope
            )
            return jax.tree.map(jnp.logical_and, fresh, masks)

        masks = jax.lax.cond(due, prune, lambda: masks)
        updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
        return updates, PruneState(inner_state, masks, step + 1)

    return optax.GradientTransformation(init, update)


def sparsity_of(params: Any, axes_tree: Any) -> float:
    """The fraction of exact zeros among the prunable weights."""
    kinds = jax.tree.leaves(prunable_leaves(axes_tree), is_leaf=lambda x: x is None)
    leaves = jax.tree.leaves(params)
    zeros = total = 0
    for p, k in zip(leaves, kinds, strict=True):
        if k is not None:
            p = np.asarray(p)
            zeros += int(np.sum(p == 0))
            total += p.size
    return zeros / max(total, 1)


def prune_params(params: Any, axes_tree: Any, sparsity: float, scope: str = "global") -> Any:
    """One-shot magnitude pruning: `params` with the smallest prunable weights set to 0."""
    masks = magnitude_masks(params, jnp.float32(sparsity), prunable_leaves(axes_tree), scope)
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)
