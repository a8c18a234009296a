"""Model compression: knowledge distillation (`distill`) and pruning (`prune`)."""

from llm_jax.compress.distill import (
    Distillation,
    Teacher,
    distill_kl,
    hidden_cosine,
    layers_from_teacher,
    prepare_teacher,
    read_teacher,
)

__all__ = [
    "Distillation",
    "Teacher",
    "distill_kl",
    "hidden_cosine",
    "layers_from_teacher",
    "prepare_teacher",
    "read_teacher",
]
