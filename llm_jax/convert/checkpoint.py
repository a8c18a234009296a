"""Our checkpoints of converted models, and loading a model from any of our checkpoints.

`save_checkpoint` writes a step-0 `CheckpointManager` checkpoint whose state is
`{"params": pure_param_dict}` and whose config is `{"model": ModelConfig.to_dict()}`, plus
the tokenizer folder when given. `restore_model` (and `load_checkpoint`, its model alone)
reads back the model from either layout our code writes:

- such a params-only checkpoint (`llm-jax convert --from-hf DIR --to CKPT`), or
- a training checkpoint (state = `TrainState` with `.params`, optimizer state, ...; config
  = the resolved run config, whose `model` section is the `ModelConfig` dict): only the
  parameters are read (orbax partial restore), never the optimizer state.
- a fine-tuning checkpoint (its config has `init`): it holds only the parameters that
  trained; the rest is read from the recorded base model (checked by its fingerprint).

Either can be given as the checkpoint workdir (the folder of numbered steps; the latest
step that passes the checksum manifest is used), a training run's workdir (its
`checkpoints/` folder is used), or one step folder (`.../<step>`); see
`llm_jax.checkpoint.locate`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

from flax import nnx

from llm_jax.checkpoint import CheckpointManager, StepRef, locate, read_params
from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.models import build
from llm_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class RestoredModel:
    """What `restore_model` returns.

    Attributes:
      model: the GPT / BERT / T5 with the checkpoint's parameters (on the first device).
      config: the step's whole saved config (a training run's resolved config, or
        `{"model": ...}` for a converted model).
      ref: the step restored; `ref.dir` is its folder and `ref.tokenizer_dir()` its copy of
        the tokenizer folder.
    """

    model: nnx.Module
    config: dict[str, Any]
    ref: StepRef

    @property
    def step_dir(self) -> Path:
        """The restored step's folder (`ref.dir`)."""
        return self.ref.dir

    @property
    def tokenizer_dir(self) -> Path | None:
        """The step's tokenizer folder, or the run's (`ref.tokenizer_dir()`)."""
        return self.ref.tokenizer_dir()

    @property
    def step(self) -> int:
        return self.ref.step


def save_checkpoint(
    model: nnx.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: Tokenizer | str | os.PathLike | None = None,
) -> Path:
    """Write `model` as step 0 of a new checkpoint workdir.

    Args:
      model: a GPT / BERT / T5.
      directory: the checkpoint workdir (must not already hold a step 0).
      tokenizer: a `Tokenizer` (saved with `Tokenizer.save`) or a tokenizer folder copied
        as is; `load_hf_tokenizer` reads either back from the step's `tokenizer/`.

    Returns:
      The step folder.
    """
    directory = Path(directory).absolute()
    state = {"params": params_of(model)}
    config = {"model": model.cfg.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = None
        if isinstance(tokenizer, Tokenizer):
            tok_dir = tokenizer.save(Path(tmp) / "tokenizer")
        elif tokenizer is not None:
            tok_dir = Path(tokenizer)
        with CheckpointManager(directory, async_save=False, max_to_keep=None) as mngr:
            if 0 in mngr.all_steps():
                raise ValueError(
                    f"{directory} already holds a checkpoint step 0; choose a new directory."
                )
            if not mngr.save(0, state, config=config, tokenizer_dir=tok_dir, force=True):
                raise ValueError(
                    f"{directory} holds later checkpoint steps {mngr.all_steps()}, so step 0 "
                    "was not written; choose a new directory."
                )
    return directory / "0"


def _model_config(config: dict[str, Any], where: Path) -> ModelConfig:
    if "model" not in config or not isinstance(config["model"], dict):
        raise ValueError(
            f"{where}: the saved config has no 'model' section (keys {sorted(config)}); this "
            "is not a checkpoint of an llm_jax model."
        )
    return ModelConfig.from_dict(config["model"])


def restore_model(
    path: str | os.PathLike, step: int | None = None, **config_overrides: Any
) -> RestoredModel:
    """The model (and saved config, step) of one of our checkpoints.

    Args:
      path: see the module docstring (workdir, run workdir or step folder).
      step: the step to load; None takes the step folder `path` names, else the newest
        step that passes verification.
      **config_overrides: ModelConfig fields that keep the parameter shapes, e.g.
        `dropout_rate=0.0`, `dtype="bfloat16"`, `scan_layers=False`.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: the step is absent or fails verification, has no model config, or its
        parameters do not fit the config (the leaves are named).
    """
    ref = locate(path, step)
    config = ref.config()
    if not config:
        raise ValueError(f"{ref.dir} has no saved config; cannot tell which model it holds.")
    cfg = _model_config(config, ref.dir)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    init = config.get("init") or {}
    if init.get("from_checkpoint") or init.get("from_hf"):
        from llm_jax.finetune.restore import finetuned_params

        params = finetuned_params(ref.dir, cfg, config)
    else:
        abstract = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
        params = read_params(ref.dir, params_of(abstract))
    return RestoredModel(model_from_params(cfg, params), config, ref)


def load_checkpoint(
    path: str | os.PathLike, step: int | None = None, **config_overrides: Any
) -> nnx.Module:
    """The model of one of our checkpoints (converted or training); see `restore_model`."""
    return restore_model(path, step, **config_overrides).model
