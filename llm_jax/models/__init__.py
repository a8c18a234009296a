"""Flax NNX models built only from `llm_jax.ops`: GPT, BERT, T5."""

from llm_jax.models.common import KVCache, count_params, param_table
from llm_jax.models.config import ModelConfig
from llm_jax.models.gpt import GPT

__all__ = ["GPT", "KVCache", "ModelConfig", "count_params", "param_table"]
