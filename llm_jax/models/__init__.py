"""Flax NNX models built only from `llm_jax.ops`: GPT, BERT, T5; ELMo (`Elmo`,
`ElmoConfig`, `ScalarMix`, loaded on first use: `import llm_jax.models` stays as fast)."""

import importlib
from typing import Any

from llm_jax.models.bert import BERT
from llm_jax.models.cache import KVCache, LayerKV
from llm_jax.models.common import count_params, param_table
from llm_jax.models.config import ModelConfig
from llm_jax.models.gpt import GPT
from llm_jax.models.t5 import T5

FAMILY_MODELS = {"gpt": GPT, "bert": BERT, "t5": T5}


def build(cfg: ModelConfig, *, rngs):
    """The model class of `cfg.family`, built from `cfg`; with `cfg.prompt_length > 0` its
    prompt-tuned variant (the same parameters plus `prompt`, see `llm_jax.finetune.prompt`)."""
    cls = FAMILY_MODELS[cfg.family]
    if cfg.prompt_length:
        # Imported here: llm_jax.finetune builds on the model classes defined in this package.
        from llm_jax.finetune.prompt import prompt_tuned_class

        cls = prompt_tuned_class(cls)
    return cls(cfg, rngs=rngs)


# Loaded on first access (PEP 562): the pre-Transformer models' modules.
_LAZY = {
    "Elmo": "llm_jax.models.elmo",
    "ElmoConfig": "llm_jax.models.elmo",
    "ScalarMix": "llm_jax.models.elmo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llm_jax.models' has no attribute {name!r}")


__all__ = [
    "BERT",
    "GPT",
    "T5",
    "Elmo",
    "ElmoConfig",
    "KVCache",
    "LayerKV",
    "ModelConfig",
    "ScalarMix",
    "build",
    "count_params",
    "param_table",
]
