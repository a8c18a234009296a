"""Fine-tuning: prompt tuning (`prompt`)."""

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
    "PromptTuned",
    "PromptTunedBERT",
    "PromptTunedGPT",
    "PromptTunedT5",
    "check_prompt_fits",
    "init_model_prompt",
    "init_prompt",
    "prompt_tuned_class",
]
