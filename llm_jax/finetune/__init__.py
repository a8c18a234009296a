"""Fine-tuning: start from a base model (ours or Hugging Face), train all of it, part of it,
low-rank adapters or a soft prompt. `config` (the `init` / `finetune` sections), `base`
(reading the base), `partition` (trainable vs frozen parameters), `lora` and `peft` (LoRA,
merging, PEFT adapter folders), `prompt` (prompt tuning).
"""

from llm_jax.finetune.config import FinetuneConfig, InitConfig
from llm_jax.finetune.lora import (
    is_lora_path,
    lora_mask,
    lora_target_names,
    merge_lora,
    merge_lora_params,
)
from llm_jax.finetune.partition import Partition, partition_for
from llm_jax.finetune.prompt import (
    PROMPT_INITS,
    PromptTuned,
    PromptTunedBERT,
    PromptTunedGPT,
    PromptTunedT5,
    check_prompt_fits,
    init_model_prompt,
    init_prompt,
    prompt_tuned_class,
)

__all__ = [
    "PROMPT_INITS",
    "FinetuneConfig",
    "InitConfig",
    "Partition",
    "PromptTuned",
    "PromptTunedBERT",
    "PromptTunedGPT",
    "PromptTunedT5",
    "check_prompt_fits",
    "init_model_prompt",
    "init_prompt",
    "is_lora_path",
    "lora_mask",
    "lora_target_names",
    "merge_lora",
    "merge_lora_params",
    "partition_for",
    "prompt_tuned_class",
]
