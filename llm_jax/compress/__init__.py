"""Model compression: knowledge distillation (`distill`), gradual magnitude pruning
(`prune`) and structured pruning of heads and neurons (`structured`)."""

from llm_jax.compress.distill import (
    Distillation,
    Teacher,
    distill_kl,
    hidden_cosine,
    layers_from_teacher,
    prepare_teacher,
    read_teacher,
)
from llm_jax.compress.prune import (
    PruneConfig,
    magnitude_masks,
    magnitude_pruning,
    prune_params,
    sparsity_of,
    sparsity_schedule,
)
from llm_jax.compress.structured import (
    gradient_saliency,
    head_scores,
    neuron_scores,
    norm_saliency,
    param_count,
    prune_structure,
)

__all__ = [
    "Distillation",
    "PruneConfig",
    "Teacher",
    "distill_kl",
    "gradient_saliency",
    "head_scores",
    "hidden_cosine",
    "layers_from_teacher",
    "magnitude_masks",
    "magnitude_pruning",
    "neuron_scores",
    "norm_saliency",
    "param_count",
    "prepare_teacher",
    "prune_params",
    "prune_structure",
    "read_teacher",
    "sparsity_of",
    "sparsity_schedule",
]
