"""The fine-tuning half of a run's set-up: the base read once, the model config, the
partition into trainable and frozen parameters, and the banner lines.

`llm_jax.train.loop.setup` calls `prepare_finetune` when the config has `init`, and takes
the trainable/frozen parameters from `FinetunePlan.split` (fresh runs) or only the frozen
part (resumed runs: the trained part comes from the run's checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from llm_jax.finetune.base import (
    Base,
    Start,
    check_fingerprint,
    finetune_model_config,
    load_base,
    start_params,
)
from llm_jax.finetune.partition import Partition, partition_for
from llm_jax.finetune.prompt import check_prompt_fits, init_prompt
from llm_jax.models.common import count_params
from llm_jax.models.config import ModelConfig

if TYPE_CHECKING:
    from llm_jax.data.tokenizer import Tokenizer
    from llm_jax.train.compile import StateLayout
    from llm_jax.train.config import RunConfig


@dataclasses.dataclass(frozen=True)
class FinetunePlan:
    """A fine-tuning run's base, model config, starting parameters and partition."""

    base: Base
    model_config: ModelConfig
    start: Start
    partition: Partition

    def reference(self) -> dict[str, Any]:
        return self.base.reference()

    def banner(self, layout: StateLayout) -> list[str]:
        """Trainable / total parameters, optimizer-state bytes, and the new parameters."""
        trainable = count_params(layout.abstract_state.params)
        total = trainable + count_params(layout.abstract_frozen)
        opt_bytes = sum(
            x.size * x.dtype.itemsize
            for x in jax.tree.leaves(layout.abstract_state.opt_state)
            if hasattr(x, "dtype")
        )
        base = f"{self.base.kind} {self.base.source}"
        if self.base.step is not None:
            base += f" (step {self.base.step})"
        return [
            f"fine-tuning from {base}",
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%); "
            f"optimizer state: {opt_bytes / 2**20:.2f} MiB",
            *self.start.report(),
        ]


def check_tokenizer(vocab: int, cfg: ModelConfig, tokenizer_path: str) -> None:
    """ValueError when the data's tokenizer has more ids than the base model's vocabulary."""
    if vocab > cfg.vocab_size:
        raise ValueError(
            f"the data tokenizer ({tokenizer_path}) has {vocab} ids but the base model's "
            f"vocabulary has {cfg.vocab_size}: the tokenizer does not belong to this model. "
            "Remove data.tokenizer_path to use the base's own tokenizer."
        )


def _with_task_head(cfg: ModelConfig, num_labels: int) -> ModelConfig:
    """For classification: a head of `num_labels` when the model has none, and a BERT
    with its pooler and without its pretraining heads (what `BertForSequenceClassification`
    keeps of a pretrained BERT), so no unused head is trained or decayed."""
    if not num_labels:
        return cfg
    changes: dict[str, Any] = {} if cfg.num_labels else {"num_labels": num_labels}
    if cfg.family == "bert":
        changes.update(use_pooler=True, use_mlm_head=False, use_nsp=False)
    return cfg.replace(**changes)


def prepare_finetune(
    cfg: RunConfig,
    *,
    base: Base,
    tokenizer: Tokenizer,
    labels: list[str] | None,
    workdir: Path,
) -> FinetunePlan:
    """The plan of a fine-tuning run from its config and its base (read by `read_base`).

    Args:
      tokenizer: the run's tokenizer (the prompt's special ids and label words).
      labels: the classification labels of the data (None for other objectives): a model
        without a classifier gets a head of this many; their words can start the prompt.
      workdir: the run folder; a resumed run checks its recorded base fingerprint.
    """
    ft = cfg.finetune
    recorded = workdir / "config.json"
    if recorded.is_file():
        check_fingerprint(json.loads(recorded.read_text()).get("init") or {}, base)
    if ft.lora_from:
        base = _with_adapter(base, ft.lora_from)
    model_cfg = finetune_model_config(base.config, cfg.model, ft)
    if cfg.data.objective == "classification":
        model_cfg = _with_task_head(model_cfg, len(labels or ()))
    if ft.method == "prompt_tuning":
        check_prompt_fits(model_cfg, cfg.data.seq_len)
    start = start_params(model_cfg, base.params, seed=cfg.train.seed, base_cfg=base.config)
    if ft.method == "prompt_tuning":
        _init_prompt(start.params, ft, tokenizer, labels, seed=cfg.train.seed)
    partition = partition_for(model_cfg, ft, start.params, start.fresh)
    return FinetunePlan(base, model_cfg, start, partition)


def _with_adapter(base: Base, adapter_dir: str) -> Base:
    """The base with a PEFT LoRA adapter folder applied (its r, alpha, targets win)."""
    from llm_jax.finetune.peft import load_peft_adapter

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ValueError(
            f"finetune.lora_from={adapter_dir}: no adapter_config.json there; give a PEFT "
            "LoRA adapter folder (adapter_config.json + adapter_model.safetensors)."
        )
    cfg, params = load_peft_adapter(base.config, base.params, adapter_dir)
    return dataclasses.replace(base, config=cfg, params=params)


def _init_prompt(params: dict, ft, tokenizer: Tokenizer, labels, *, seed: int) -> None:
    """Start the soft prompt (in place) from vocabulary rows, label words or at random."""
    token_ids = None
    if ft.prompt_init == "labels":
        if not labels:
            raise ValueError(
                "finetune.prompt_init=labels starts the prompt from the class-label words, "
                "but this objective has no labels; use prompt_init=vocab."
            )
        token_ids = [tokenizer.encode(word) or [tokenizer.unk_id or 0] for word in labels]
    params["prompt"] = init_prompt(
        params["embed"]["embedding"],
        ft.prompt_length,
        seed=seed,
        method=ft.prompt_init,
        token_ids=token_ids,
        exclude_ids=[int(i) for i in tokenizer.all_special_ids],
    )


def read_base(cfg: RunConfig) -> Base:
    """The base model of `cfg.init`, read before any data work; reports what it read."""
    base = load_base(cfg.init)
    print(f"base model: {base.kind} {base.source}", file=sys.stderr)
    return base
