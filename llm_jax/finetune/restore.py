"""The whole parameters of a fine-tuning checkpoint: the recorded base, with the trained
part read from the step on top (`convert.restore_model` calls this)."""

from __future__ import annotations

import os
from typing import Any

import jax

from llm_jax.checkpoint.manager import read_params
from llm_jax.finetune.base import base_from_reference, start_params
from llm_jax.finetune.config import FinetuneConfig
from llm_jax.finetune.partition import partition_for
from llm_jax.models.config import ModelConfig


def finetuned_params(
    step_dir: str | os.PathLike, cfg: ModelConfig, config: dict[str, Any]
) -> dict[str, Any]:
    """Base parameters (from `config["init"]`) + the step's trained ones, as one tree.

    Raises:
      ValueError: the base is gone or changed (fingerprint), or the step does not fit.
    """
    base = base_from_reference(config["init"])
    finetune = FinetuneConfig.from_dict(config.get("finetune") or {})
    seed = int((config.get("train") or {}).get("seed", 0))
    start = start_params(cfg, base.params, seed=seed, base_cfg=base.config)
    partition = partition_for(cfg, finetune, start.params, start.fresh)
    trainable, frozen = partition.split(start.params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    trained = jax.tree.map(jax.device_get, read_params(step_dir, abstract))
    return partition.combine(trained, frozen)
