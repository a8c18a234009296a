"""llm_jax: large language models from theory to practice, in JAX and Flax NNX."""

from llm_jax import convert, data, models, ops, sample
from llm_jax.data.config import DataConfig
from llm_jax.models.config import ModelConfig

__all__ = ["DataConfig", "ModelConfig", "convert", "data", "models", "ops", "sample"]
__version__ = "0.1.0"
