"""The `init` and `finetune` sections of a run config: where the weights start, and which of
them train.

    init:      {from_checkpoint: runs/bert_tiny}          # or from_hf: path/to/hf_folder
    finetune:  {method: lora, lora_rank: 8, lora_targets: [q, v]}

`init` names a base model (one of our run or step folders, or a Hugging Face folder); its
weights, model config and tokenizer start the run. `finetune.method` is `full`, `lora` or
`prompt_tuning`; `finetune.trainable` picks which base parameters train (see
`llm_jax.finetune.partition`). Without `init` a run pretrains from random weights, as
before, and only the defaults of `finetune` are allowed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from llm_jax.config import Config, at_least, in_interval, one_of

METHODS = ("full", "lora", "prompt_tuning")
TRAINABLE = ("auto", "all", "head", "top:K", "bottom:K", "encoder", "decoder", "no_embeddings")
PROMPT_INITS = ("vocab", "labels", "random")
LORA_MODULES = ("q", "k", "v", "o", "wi", "wi_gate", "wo")

_LAYER_RANGE = re.compile(r"^(top|bottom):([0-9]+)$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitConfig(Config):
    """The base model a run starts from (at most one of the two sources).

    Attributes:
      from_checkpoint: one of our run folders, checkpoint folders or step folders.
      from_hf: a Hugging Face model folder (`config.json` + safetensors) that
        `llm_jax.convert.load_hf` reads.
      step: with `from_checkpoint`, the step to start from (default: the newest intact).
    """

    section: ClassVar[str] = "init"

    from_checkpoint: str | None = None
    from_hf: str | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if self.from_checkpoint and self.from_hf:
            raise ValueError("init: set either init.from_checkpoint or init.from_hf, not both.")
        if self.step is not None and not self.from_checkpoint:
            raise ValueError("init.step picks a step of init.from_checkpoint; set that too.")

    @property
    def source(self) -> str | None:
        """The base folder, or None for a run from random weights."""
        return self.from_checkpoint or self.from_hf


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig(Config):
    """What trains, and how (see the module docstring).

    Attributes:
      method: `full` (the parameters `trainable` picks), `lora` (low-rank adapters on the
        `lora_targets` layers; the base frozen) or `prompt_tuning` (`prompt_length` learned
        input vectors; the base frozen).
      trainable: `auto` (everything for `full`, nothing of the base otherwise), `all`,
        `head` (new heads only), `top:K` / `bottom:K` (K transformer layers of each stack,
        plus the heads), `encoder` / `decoder` (T5: the other stack frozen),
        `no_embeddings`. New parameters (heads, adapters, the prompt) always train.
      lora_rank, lora_alpha, lora_dropout, lora_targets: r, alpha (the update is scaled by
        alpha / r, as PEFT does), dropout on the adapter's input, and the layers that get
        adapters (q k v o wi wi_gate wo, or all_linear).
      lora_from: a PEFT adapter folder to start the adapters from; its rank, alpha,
        dropout and target layers replace the `lora_*` fields.
      prompt_length, prompt_init: P, and the prompt's start: rows of the vocabulary
        embeddings, the embeddings of the class-label words, or random.
    """

    section: ClassVar[str] = "finetune"

    method: str = "full"
    trainable: str = "auto"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("q", "v")
    lora_from: str | None = None
    prompt_length: int = 20
    prompt_init: str = "vocab"

    def __post_init__(self) -> None:
        one_of(self, "method", METHODS)
        one_of(self, "prompt_init", PROMPT_INITS)
        at_least(self, "lora_rank", 1)
        at_least(self, "lora_alpha", 0, strict=True)
        in_interval(self, "lora_dropout", 0, 1, high_open=True)
        at_least(self, "prompt_length", 1)
        if self.trainable not in TRAINABLE and not _LAYER_RANGE.match(self.trainable):
            raise ValueError(
                f"finetune.trainable={self.trainable!r} is not one of {list(TRAINABLE)} "
                "(K a number of layers, e.g. top:2)."
            )
        if self.layer_range is not None and self.layer_range[1] < 1:
            raise ValueError(f"finetune.trainable={self.trainable!r}: K must be at least 1.")
        unknown = sorted(set(self.lora_targets) - {*LORA_MODULES, "all_linear"})
        if unknown:
            raise ValueError(
                f"finetune.lora_targets names {unknown}, which are no layer names; choose from "
                f"{[*LORA_MODULES, 'all_linear']}."
            )
        if self.lora_from and self.method != "lora":
            raise ValueError("finetune.lora_from loads LoRA adapters; set finetune.method=lora.")

    @property
    def layer_range(self) -> tuple[str, int] | None:
        """("top" | "bottom", K) for `top:K` / `bottom:K`, else None."""
        m = _LAYER_RANGE.match(self.trainable)
        return None if m is None else (m.group(1), int(m.group(2)))

    @property
    def is_default(self) -> bool:
        return self == FinetuneConfig()
