"""Fine-tuning: LoRA adapters (merge, PEFT adapter folders)."""

from llm_jax.finetune.lora import (
    is_lora_path,
    lora_mask,
    lora_target_names,
    merge_lora,
    merge_lora_params,
)

__all__ = [
    "is_lora_path",
    "lora_mask",
    "lora_target_names",
    "merge_lora",
    "merge_lora_params",
]
