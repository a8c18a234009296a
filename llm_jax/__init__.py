"""llm_jax: large language models from theory to practice, in JAX and Flax NNX.

The subpackages load on first use (`lj.models`, `lj.ops`, ...), so `import llm_jax` and the
`llm-jax` command start at once and a Ctrl-C during their start-up is handled by the CLI.
"""

import importlib
from typing import Any

_SUBPACKAGES = (
    "checkpoint",
    "compress",
    "convert",
    "data",
    "eval",
    "finetune",
    "models",
    "notebook",
    "ops",
    "parallel",
    "sample",
    "train",
)
_NAMES = {"DataConfig": "llm_jax.data.config", "ModelConfig": "llm_jax.models.config"}

__all__ = ["DataConfig", "ModelConfig", *_SUBPACKAGES]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"llm_jax.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(f"module 'llm_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
