"""Fine-tuning: start from a base model (ours or Hugging Face), train all of it, part of it,
low-rank adapters or a soft prompt. See `config` (the `init` / `finetune` sections),
`base` (reading the base), `partition` (trainable vs frozen parameters)."""

from llm_jax.finetune.config import FinetuneConfig, InitConfig
from llm_jax.finetune.partition import Partition, partition_for

__all__ = ["FinetuneConfig", "InitConfig", "Partition", "partition_for"]
