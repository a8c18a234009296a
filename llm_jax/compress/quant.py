"""Weight-only post-training quantization of a whole model.

`quantize(model, bits=8)` returns the same model with every dense kernel (the `Einsum`
layers) and the GPT token embedding (which is also the tied output head) stored as int8
per output channel; `bits=4` stores packed int4 with one scale per `group_size` inputs.
Activations stay in the compute dtype: each kernel is dequantized right before its
product. The result is an ordinary model of the config with `quant_bits` /
`quant_group_size` set, so `generate`, evaluation, `save_checkpoint` and `restore_model`
take it unchanged (the checkpoint's config records the settings and rebuilds it).

Quantization has no calibration: scales are max|w| / qmax per group (`llm_jax.ops.quant`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.models import build
from llm_jax.models.layers import Einsum, Embed, num_inputs
from llm_jax.ops import quant as quant_ops

DEFAULT_GROUP_SIZE = {8: 0, 4: 128}


def _check(model: nnx.Module, bits: int, group_size: int | None) -> int:
    """The group size to use; ValueError naming the fix for bad arguments."""
    if bits not in DEFAULT_GROUP_SIZE:
        raise ValueError(f"bits={bits!r} is not supported: use bits=8 (int8) or bits=4 (int4).")
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise ValueError(f"quantize takes an llm_jax model (GPT, BERT, T5); got {type(model)}.")
    if cfg.quant_bits:
        raise ValueError(
            f"the model is already quantized (quant_bits={cfg.quant_bits}); quantize its float "
            "original, or call llm_jax.compress.dequantize first."
        )
    if cfg.lora_rank:
        raise ValueError(
            "the model has LoRA adapters: merge them first (llm_jax.finetune), then quantize."
        )
    group_size = DEFAULT_GROUP_SIZE[bits] if group_size is None else group_size
    if not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"group_size={group_size!r} must be an int >= 0 (0: per channel).")
    return group_size


def _modules(model: nnx.Module) -> dict[tuple, Any]:
    return {path: node for path, node in nnx.iter_graph(model) if isinstance(node, Einsum | Embed)}


def _set(tree: dict, path: tuple, values: dict[str, Any]) -> None:
    for key in path:
        tree = tree[key]
    tree.update(values)


def _quantize_leaf(w: jax.Array, num_lead: int, bits: int, group_size: int, scale_dtype) -> tuple:
    """quant_ops.quantize over the leading (stacked-layer) axes of a kernel [L..., I, O...]."""
    fn = lambda k: quant_ops.quantize(k, bits, group_size, scale_dtype)  # noqa: E731
    for _ in range(num_lead):
        fn = jax.vmap(fn)
    return jax.jit(fn)(w)


def quantize(
    model: nnx.Module,
    bits: int = 8,
    group_size: int | None = None,
    embed_bits: int = 0,
    *,
    method: str = "rtn",
    calibration: Any = None,
    **gptq_options: Any,
) -> nnx.Module:
    """`model` with its dense kernels and token embedding quantized (weight-only).

    Args:
      model: a float GPT / BERT / T5 (no LoRA adapters).
      bits: 8 (int8, one scale per output channel by default) or 4 (packed int4).
      group_size: inputs per scale; must divide every quantized kernel's input size (the
        flattened contracted axes) and be even for int4. None: 0 (per channel) for int8,
        128 for int4; 0: per channel.
      embed_bits: 8 stores the token embedding (GPT's tied head too) int8 per channel
        whatever `bits` is; 0 quantizes it like the kernels.
      method: "rtn" rounds each weight to nearest (no data); "gptq" chooses the dense
        kernels by GPTQ on `calibration` (`llm_jax.compress.gptq`, GPT models), same format.
      calibration: token ids [n, T] for method="gptq".
      **gptq_options: `percdamp`, `batch_size` of `gptq` (method="gptq" only).

    Returns:
      A new model of `model.cfg` with `quant_bits=bits, quant_group_size=group_size`:
      `kernel` int8 [I / pack, O...] and `scale` [G, O...] in param_dtype per `Einsum`
      (layer stacks keep their leading L axis); GPT's `embed.embedding` int8 [E / pack, V]
      with `embed.scale` [G, V] (int8 [E, V] and [1, V] with embed_bits=8). Everything
      else (norms, biases, position tables) is copied.

    Raises:
      ValueError: bits not 8 or 4, a group size that does not divide a kernel's inputs,
        an already quantized or LoRA model, an unknown method, calibration data with
        method="rtn" (all before any computation).
    """
    if method not in ("rtn", "gptq"):
        raise ValueError(
            f"method={method!r}: use 'rtn' (round to nearest, no data) or 'gptq' (needs "
            "calibration token ids)."
        )
    if method == "gptq":
        from llm_jax.compress.gptq_quant import gptq  # it builds on this module

        return gptq(model, calibration, bits, group_size, embed_bits, **gptq_options)
    if calibration is not None or gptq_options:
        raise ValueError(
            f"calibration and {sorted(gptq_options)} are only used by method='gptq'; pass "
            "that method."
        )
    group_size = _check(model, bits, group_size)
    if embed_bits not in (0, 8):
        raise ValueError(f"embed_bits={embed_bits!r}: use 8 (int8 embedding) or 0 (like bits).")
    qcfg = model.cfg.replace(
        quant_bits=bits, quant_group_size=group_size, quant_embed_bits=embed_bits
    )
    abstract = nnx.eval_shape(lambda: build(qcfg, rngs=nnx.Rngs(0)))  # shape checks raise here
    source = _modules(model)
    params = params_of(model)
    scale_dtype = jnp.dtype(qcfg.param_dtype)
    for path, target in _modules(abstract).items():
        if target.quant is None:
            continue
        module = source[path]
        if isinstance(module, Embed):
            w = module.embedding[...].T  # [E, V]: the kernel of `attend`
            quant = target.quant  # the embedding's own settings
            q, s = _quantize_leaf(w, 0, quant.bits, quant.group_size, scale_dtype)
            _set(params, path, {"embedding": q, "scale": s})
            continue
        w = module.kernel[...]  # [L..., in..., out...]
        num_lead = w.ndim - len(module.kernel_shape)
        n_in = num_inputs(module.equation)
        flat = w.reshape(*w.shape[:num_lead], -1, *module.kernel_shape[n_in:])  # [L..., I, O...]
        q, s = _quantize_leaf(flat, num_lead, bits, group_size, scale_dtype)
        _set(params, path, {"kernel": q, "scale": s})
    return model_from_params(qcfg, params)


def dequantize(model: nnx.Module) -> nnx.Module:
    """The float model of a quantized one (q * scale in param_dtype), e.g. to export it."""
    cfg = model.cfg
    if not cfg.quant_bits:
        return model
    fcfg = cfg.replace(quant_bits=0, quant_group_size=0, quant_embed_bits=0)
    params = params_of(model)
    dtype = jnp.dtype(cfg.param_dtype)
    for path, module in _modules(model).items():
        if module.quant is None:
            continue
        if isinstance(module, Embed):
            q, s = module.embedding[...], module.scale[...]
            table_t = quant_ops.dequantize(q, s, module.quant.bits)
            _set(params, path, {"embedding": table_t.T.astype(dtype)})
            del _get(params, path)["scale"]
            continue
        q, s = module.kernel[...], module.scale[...]
        num_lead = q.ndim - (1 + len(module.kernel_shape) - num_inputs(module.equation))
        fn = lambda q, s: quant_ops.dequantize(q, s, cfg.quant_bits, dtype)  # noqa: E731
        for _ in range(num_lead):
            fn = jax.vmap(fn)
        w = fn(q, s).reshape(*q.shape[:num_lead], *module.kernel_shape)
        _set(params, path, {"kernel": w})
        del _get(params, path)["scale"]
    return model_from_params(fcfg, params)


def _get(tree: dict, path: tuple) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of all the model's parameters as stored (int8 kernels count 1 byte a value)."""
    leaves = jax.tree.leaves(params_of(model))
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves))
