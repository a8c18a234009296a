"""Structured pruning: drop whole attention heads and MLP neurons, giving a smaller model.

Each head and each hidden neuron of the feed-forward gets an importance, the sum over its
weights of a saliency: w^2 (`norm`: the squared L2 norm of everything the unit owns) or
|w · g| summed over a few batches (`gradient`: the first-order Taylor estimate of the loss
change when the unit is removed, Molchanov et al. 2019). Per layer the `heads` most
important heads and the `ffn` most important neurons stay; the result is an ordinary model
config with N = heads (K = N, H unchanged) and F = ffn, whose parameters are the kept
slices, so it saves, loads and decodes like any other.

A head owns its slices of q, k, v (kernels [L, D, N, H], biases [L, N, H]) and of o's
kernel [L, N, H, D]; a neuron owns wi's (and wi_gate's) column [L, D, F] and bias [L, F]
and wo's row [L, F, D].

Shape letters: L layers, D model width, N heads, H head dim, F d_ff.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.models.config import ModelConfig

IMPORTANCE = ("norm", "gradient")
# (module, leaf) -> the axis of the head / neuron index in the stacked [L, ...] array.
HEAD_AXES = {
    ("q", "kernel"): 2,
    ("q", "bias"): 1,
    ("k", "kernel"): 2,
    ("k", "bias"): 1,
    ("v", "kernel"): 2,
    ("v", "bias"): 1,
    ("o", "kernel"): 1,
}
NEURON_AXES = {
    ("wi", "kernel"): 2,
    ("wi", "bias"): 1,
    ("wi_gate", "kernel"): 2,
    ("wi_gate", "bias"): 1,
    ("wo", "kernel"): 1,
}


def _blocks(params: dict[str, Any]) -> dict[str, Any]:
    return params["layers"]["blocks"]


def check_prunable(cfg: ModelConfig, heads: int, ffn: int) -> None:
    """ValueError (naming the fix) unless `cfg` can be cut to `heads` heads and `ffn`."""
    if cfg.family not in ("gpt", "bert"):
        raise ValueError(f"structured pruning handles gpt and bert models; this is a {cfg.family}.")
    if cfg.lora_rank:
        raise ValueError("the model has LoRA adapters: merge them first (llm-jax convert).")
    if getattr(cfg, "share_layers", False):
        raise ValueError("the model shares one block across layers (ALBERT); cannot prune it.")
    if not 1 <= heads <= cfg.num_heads:
        raise ValueError(f"--heads {heads}: keep between 1 and {cfg.num_heads} heads.")
    if not 1 <= ffn <= cfg.d_ff:
        raise ValueError(f"--ffn {ffn}: keep between 1 and {cfg.d_ff} neurons.")
    if heads < cfg.num_heads and cfg.num_kv_heads != cfg.num_heads:
        raise ValueError(
            f"head pruning needs multi-head attention (num_kv_heads == num_heads); this "
            f"model groups {cfg.num_heads} query heads over {cfg.num_kv_heads} kv heads. "
            f"Keep --heads {cfg.num_heads} (prune only the MLP)."
        )


def _scores(saliency: dict[str, Any], group: str, axes: dict) -> np.ndarray:
    """[L, units]: the saliency summed over everything else each unit owns."""
    blocks = _blocks(saliency)[group]
    total = None
    for (module, leaf), axis in axes.items():
        x = (blocks.get(module) or {}).get(leaf)
        if x is None:
            continue
        x = np.asarray(x, np.float64)
        other = tuple(a for a in range(1, x.ndim) if a != axis)
        s = x.sum(axis=other)  # [L, units]
        total = s if total is None else total + s
    return total


def head_scores(saliency: dict[str, Any]) -> np.ndarray:
    """[L, N] importance of each attention head (see the module docstring)."""
    return _scores(saliency, "self_attn", HEAD_AXES)


def neuron_scores(saliency: dict[str, Any]) -> np.ndarray:
    """[L, F] importance of each feed-forward neuron."""
    return _scores(saliency, "mlp", NEURON_AXES)


def norm_saliency(params: dict[str, Any]) -> dict[str, Any]:
    """w^2 of every parameter (the `norm` importance)."""
    return jax.tree.map(lambda w: np.square(np.asarray(w, np.float64)), params)


def gradient_saliency(model: nnx.Module, batches: Iterable[dict], objective: str) -> dict:
    """Σ over `batches` of |w · ∂loss/∂w| (the `gradient` importance), no dropout.

    Args:
      model: the model to score.
      batches: batches of the model's objective (`llm_jax.data` contracts).
      objective: the objective whose main loss is differentiated.
    """
    from llm_jax.data.objectives import objective_spec
    from llm_jax.train.losses import LOSSES, LossConfig

    spec = objective_spec(objective)
    losses_fn = LOSSES[spec.name]
    graphdef, state = nnx.split(model, nnx.Param)

    @jax.jit
    def saliency(params, batch):
        def loss(p):
            s, c = losses_fn(nnx.merge(graphdef, p), batch, None, LossConfig())[spec.main_loss]
            return s / jnp.maximum(c, 1.0)

        grads = jax.grad(loss)(params)
        return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)

    params = nnx.to_pure_dict(state)
    total = None
    for batch in batches:
        s = jax.device_get(saliency(params, batch))
        total = s if total is None else jax.tree.map(np.add, total, s)
    if total is None:
        raise ValueError("gradient importance needs at least one batch; give --batches >= 1.")
    return total


def _keep(scores: np.ndarray, k: int) -> np.ndarray:
    """[L, k] indices of each layer's k highest scores, in their original order."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.sort(order, axis=1)


def _take(x: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """Per layer l, x[l] restricted to `index[l]` along `axis` (x is [L, ...])."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = index.shape
    return np.take_along_axis(x, index.reshape(shape), axis=axis)


def prune_structure(
    cfg: ModelConfig,
    params: dict[str, Any],
    *,
    heads: int,
    ffn: int,
    saliency: dict[str, Any] | None = None,
) -> tuple[ModelConfig, dict[str, Any]]:
    """The smaller model: each layer's `heads` most important heads and `ffn` neurons.

    Args:
      cfg: the model's config (gpt or bert, multi-head attention to prune heads).
      params: its parameters (nested dict).
      heads, ffn: how many heads and feed-forward neurons each layer keeps.
      saliency: per-parameter saliency (`norm_saliency`, `gradient_saliency`); default
        the norm.

    Returns:
      (config with num_heads = num_kv_heads = heads (K kept when no head prunes), head_dim
      kept, d_ff = ffn; the parameters).
    """
    check_prunable(cfg, heads, ffn)
    saliency = norm_saliency(params) if saliency is None else saliency
    params = jax.tree.map(np.asarray, params)
    blocks = _blocks(params)
    cuts = [("mlp", NEURON_AXES, _keep(neuron_scores(saliency), ffn))]
    if heads < cfg.num_heads:
        cuts.append(("self_attn", HEAD_AXES, _keep(head_scores(saliency), heads)))
    for group, axes, index in cuts:
        for (module, leaf), axis in axes.items():
            if module in blocks[group] and blocks[group][module].get(leaf) is not None:
                blocks[group][module][leaf] = _take(blocks[group][module][leaf], index, axis)
    kv_heads = cfg.num_kv_heads if heads == cfg.num_heads else heads  # MHA when heads prune
    new_cfg = cfg.replace(num_heads=heads, num_kv_heads=kv_heads, head_dim=cfg.head_dim, d_ff=ffn)
    return new_cfg, params


def param_count(cfg: ModelConfig, heads: int, ffn: int) -> int:
    """Parameters of `cfg` cut to `heads` heads and `ffn` neurons, by formula: each layer
    loses (N − heads)·(4·D·H + 3·H) attention weights (q, k, v, o kernels; q, k, v biases
    when the model has biases) and (F − ffn)·(m·D + D + m') feed-forward ones, m = 2 for a
    gated MLP (wi, wi_gate), m' the biases."""
    from llm_jax.models import build
    from llm_jax.models.common import count_params

    whole = count_params(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))))
    d, h, bias = cfg.d_model, cfg.head_dim, int(cfg.use_bias)
    gated = 2 if cfg.gated_mlp else 1
    per_head = 4 * d * h + 3 * h * bias
    per_neuron = gated * d + d + gated * bias
    removed = (cfg.num_heads - heads) * per_head + (cfg.d_ff - ffn) * per_neuron
    return whole - cfg.num_layers * removed
