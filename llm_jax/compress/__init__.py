"""Model compression: weight-only int8 / int4 quantization (`quant`; GPTQ in `gptq_quant`),
knowledge distillation (`distill`), gradual magnitude pruning (`prune`) and structured pruning of
heads and neurons (`structured`).

Names load on first use, so `import llm_jax.compress` stays cheap (and `train.config`,
which reads `compress.prune`'s config, never imports the training code back through
here); each entry of `_NAMES` maps a public name to the module that defines it.
"""

import importlib
from typing import Any

_NAMES = {
    "quantize": "llm_jax.compress.quant",
    "gptq": "llm_jax.compress.gptq_quant",
    "gptq_kernel": "llm_jax.compress.gptq_quant",
    "text_windows": "llm_jax.compress.gptq_quant",
    "dequantize": "llm_jax.compress.quant",
    "weight_bytes": "llm_jax.compress.quant",
    "Distillation": "llm_jax.compress.distill",
    "Teacher": "llm_jax.compress.distill",
    "distill_kl": "llm_jax.compress.distill",
    "hidden_cosine": "llm_jax.compress.distill",
    "layers_from_teacher": "llm_jax.compress.distill",
    "prepare_teacher": "llm_jax.compress.distill",
    "read_teacher": "llm_jax.compress.distill",
    "PruneConfig": "llm_jax.compress.prune",
    "magnitude_masks": "llm_jax.compress.prune",
    "magnitude_pruning": "llm_jax.compress.prune",
    "prune_params": "llm_jax.compress.prune",
    "sparsity_of": "llm_jax.compress.prune",
    "sparsity_schedule": "llm_jax.compress.prune",
    "gradient_saliency": "llm_jax.compress.structured",
    "head_scores": "llm_jax.compress.structured",
    "neuron_scores": "llm_jax.compress.structured",
    "norm_saliency": "llm_jax.compress.structured",
    "param_count": "llm_jax.compress.structured",
    "prune_structure": "llm_jax.compress.structured",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'llm_jax.compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
