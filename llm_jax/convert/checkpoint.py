"""Our checkpoints of converted models, and loading a model from any of our checkpoints.

`save_checkpoint` writes a step-0 `CheckpointManager` checkpoint whose state is
`{"params": pure_param_dict}` and whose config is `{"model": ModelConfig.to_dict()}`, plus
the tokenizer folder when given. `load_checkpoint` reads back the model from either layout
our code writes:

- such a params-only checkpoint (`llm-jax convert --from-hf DIR --to CKPT`), or
- a training checkpoint (state = `TrainState` with `.params`, optimizer state, ...; config
  = the resolved run config, whose `model` section is the `ModelConfig` dict): only the
  parameters are read (orbax partial restore), never the optimizer state.

Either can be given as the checkpoint workdir (the folder of numbered steps; the latest
step that passes the checksum manifest is used), a training run's workdir (its
`checkpoints/` folder is used), or one step folder (`.../<step>`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from llm_jax.checkpoint import CheckpointManager, verify_step_dir
from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.models import build
from llm_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """What `restore_model` returns.

    Attributes:
      model: the GPT / BERT / T5 with the checkpoint's parameters.
      config: the step's whole saved config (a training run's resolved config, or
        `{"model": ...}` for a converted model).
      step: the step restored.
      step_dir: the step folder.
      tokenizer_dir: the step's copy of the tokenizer folder, or None.
    """

    model: nnx.Module
    config: dict[str, Any]
    step: int
    step_dir: Path
    tokenizer_dir: Path | None


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


def _locate(path: Path) -> tuple[Path, int]:
    """(checkpoint workdir, step) for a step folder, a checkpoint workdir or a run workdir."""
    if (path / "state").is_dir() and path.name.isdigit():
        check = verify_step_dir(path, int(path.name))
        if not check.ok:
            raise ValueError(f"checkpoint step folder {path} {check.reason}.")
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir() and not any(p.name.isdigit() for p in path.iterdir()):
        path = path / "checkpoints"
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}.")
    with CheckpointManager(path) as mngr:
        step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no verified checkpoint step in {str(path)!r}; pass a checkpoint workdir, a "
            "training run's workdir or a step folder."
        )
    return path, step


def _model_config(config: dict[str, Any], where: Path) -> ModelConfig:
    if "model" not in config or not isinstance(config["model"], dict):
        raise ValueError(
            f"{where}: the saved config has no 'model' section (keys {sorted(config)}); this "
            "is not a checkpoint of an llm_jax model."
        )
    return ModelConfig.from_dict(config["model"])


def _check_saved_shapes(saved: Any, wanted: Any, step_dir: Path) -> None:
    saved_flat = {
        jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()))
        for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]
    }
    wanted_flat = {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(wanted)[0]
    }
    missing = sorted(set(wanted_flat) - set(saved_flat))
    extra = sorted(set(saved_flat) - set(wanted_flat))
    wrong = [
        f"{k}: saved {saved_flat[k]}, model {v}"
        for k, v in wanted_flat.items()
        if k in saved_flat and saved_flat[k] != v
    ]
    if missing or extra or wrong:
        raise ValueError(
            f"the parameters in {step_dir} do not fit the model of its config: missing "
            f"{missing[:8]}, unexpected {extra[:8]}, shapes {wrong[:8]}."
        )


def restore_model(path: str | os.PathLike, **config_overrides: Any) -> LoadedCheckpoint:
    """The model (and config, tokenizer folder) of one of our checkpoints.

    Args:
      path: see the module docstring (workdir, run workdir or step folder).
      **config_overrides: ModelConfig fields that keep the parameter shapes, e.g.
        `dropout_rate=0.0`, `dtype="bfloat16"`, `scan_layers=False`.

    Raises:
      FileNotFoundError: no checkpoint there.
      ValueError: the step fails verification, has no model config, or its parameters do
        not fit the config (the leaf is named).
    """
    root, step = _locate(Path(path).absolute())
    step_dir = root / str(step)
    config_file = step_dir / "config" / "metadata"
    if not config_file.is_file():
        raise ValueError(f"{step_dir} has no saved config; cannot tell which model it holds.")
    config = json.loads(config_file.read_text())
    cfg = _model_config(config, step_dir)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    abstract = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    target = {"params": params_of(abstract)}
    handler = ocp.PyTreeCheckpointHandler()
    tree = handler.metadata(epath.Path(step_dir / "state")).tree
    if "params" not in tree:
        raise ValueError(
            f"{step_dir}/state has no 'params' (it has {sorted(tree)}); not a model checkpoint."
        )
    _check_saved_shapes(tree["params"], target["params"], step_dir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=device, global_shape=x.shape, dtype=x.dtype),
        target,
    )
    restored = handler.restore(
        epath.Path(step_dir / "state"),
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
    model = model_from_params(cfg, restored["params"])
    tok = step_dir / "tokenizer"
    return LoadedCheckpoint(model, config, step, step_dir, tok if tok.is_dir() else None)


def load_checkpoint(path: str | os.PathLike, **config_overrides: Any) -> nnx.Module:
    """The model of one of our checkpoints (converted or training); see `restore_model`."""
    return restore_model(path, **config_overrides).model
