"""Model compression: weight-only quantization (`quantize`, `dequantize`).

Names load on first use, so `import llm_jax.compress` stays cheap; each entry of `_NAMES`
maps a public name to the module that defines it.
"""

import importlib
from typing import Any

_NAMES = {
    "quantize": "llm_jax.compress.quant",
    "dequantize": "llm_jax.compress.quant",
    "weight_bytes": "llm_jax.compress.quant",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'llm_jax.compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
