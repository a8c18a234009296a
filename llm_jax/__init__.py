"""llm_jax: large language models from theory to practice, in JAX and Flax NNX."""

from llm_jax import models, ops
from llm_jax.models.config import ModelConfig

__all__ = ["ModelConfig", "models", "ops"]
__version__ = "0.1.0"
