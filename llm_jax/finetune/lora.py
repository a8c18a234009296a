"""LoRA adapters of a model: which layers have them, which parameters they are, merging.

A model whose config has `lora_rank=r > 0` carries, on each targeted dense layer of its
blocks, `lora_a` [in..., R] and `lora_b` [R, out...] beside the frozen `kernel`
[in..., out...]; its forward adds (alpha / r) x A B (`llm_jax.ops.lora_update`). Merging
folds that update into the kernel, kernel + (alpha / r) A B, and drops the factors: the
merged model (config `lora_rank=0`) computes the same function with the base model's
parameter tree, for export and for inference without the extra matmuls.

Shape letters: L layers (stacked), I a layer's flattened inputs, O its flattened outputs,
R the rank.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.convert.hf_weights import flatten_tree, unflatten_tree
from llm_jax.models.config import ModelConfig

LORA_LEAVES = ("lora_a", "lora_b")


def lora_target_names(cfg: ModelConfig) -> tuple[str, ...]:
    """The dense layer names (q, k, v, o, wi, wi_gate, wo) that carry LoRA factors in the
    model of `cfg`, with "all_linear" expanded; () when `cfg.lora_rank` is 0."""
    return cfg.lora_layers


def is_lora_path(path: str) -> bool:
    """Whether a '/'-joined parameter path is a LoRA factor (…/lora_a or …/lora_b)."""
    return path.rsplit("/", 1)[-1] in LORA_LEAVES


def lora_mask(params: dict[str, Any]) -> dict[str, Any]:
    """A tree shaped like the nested parameter dict `params`: True on LoRA factors."""
    flat = flatten_tree(params)
    return unflatten_tree({k: is_lora_path(k) for k in flat})


def lora_delta(
    lora_a: jax.Array, lora_b: jax.Array, kernel_shape: tuple[int, ...], scale: float
) -> jax.Array:
    """scale * A B as an increment of a kernel of `kernel_shape` [*L, in..., out...].

    Args:
      lora_a: A [*L, in..., R] (leading axes, e.g. the stacked layers, are batch).
      lora_b: B [*L, R, out...].
      kernel_shape: the kernel's shape, which fixes how many leading axes are batch.
      scale: alpha / r.

    Returns:
      The increment, shaped `kernel_shape`, float32.
    """
    # kernel [*L, in..., out...], A [*L, in..., R], B [*L, R, out...]: the number of
    # batch axes is what A and B have beyond the kernel's axes and their two R axes.
    n_lead = lora_a.ndim + lora_b.ndim - 2 - len(kernel_shape)
    lead = tuple(kernel_shape[:n_lead])
    rank = lora_a.shape[-1]
    a = jnp.reshape(lora_a, (*lead, -1, rank)).astype(jnp.float32)  # [*L, I, R]
    b = jnp.reshape(lora_b, (*lead, rank, -1)).astype(jnp.float32)  # [*L, R, O]
    delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * scale  # [*L, I, O]
    return jnp.reshape(delta, kernel_shape)


def merge_lora_params(
    cfg: ModelConfig, params: dict[str, Any]
) -> tuple[ModelConfig, dict[str, Any]]:
    """Fold every LoRA update into its kernel: (config with lora_rank=0, parameters).

    Args:
      cfg: a config with `lora_rank > 0` (a config without LoRA is returned unchanged).
      params: the model's nested pure parameter dict (NumPy or JAX leaves).

    Returns:
      The base config (`lora_rank=0`) and the base model's parameter tree, each adapted
      kernel replaced by kernel + (alpha / r) A B (in the kernel's dtype).

    Raises:
      ValueError: a LoRA factor without its partner or its kernel.
    """
    if not cfg.lora_rank:
        return cfg, params
    flat = flatten_tree(params)
    merged = {k: v for k, v in flat.items() if not is_lora_path(k)}
    for path in flat:
        if not path.endswith("/lora_a"):
            continue
        layer = path[: -len("lora_a")]
        if layer + "lora_b" not in flat or layer + "kernel" not in flat:
            raise ValueError(f"{path} has no lora_b or kernel beside it; not a LoRA layer.")
        kernel = flat[layer + "kernel"]
        delta = lora_delta(flat[path], flat[layer + "lora_b"], kernel.shape, cfg.lora_scale)
        merged[layer + "kernel"] = (jnp.asarray(kernel, jnp.float32) + delta).astype(kernel.dtype)
    orphans = [p for p in flat if p.endswith("/lora_b") and p[:-1] + "a" not in flat]
    if orphans:
        raise ValueError(f"LoRA factors without lora_a: {orphans}.")
    return cfg.replace(lora_rank=0), unflatten_tree(merged)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """The model with its LoRA updates merged into the kernels (`merge_lora_params`): the
    same function, the base architecture (config `lora_rank=0`), no LoRA parameters."""
    cfg, params = merge_lora_params(model.cfg, params_of(model))
    return model_from_params(cfg, params)
