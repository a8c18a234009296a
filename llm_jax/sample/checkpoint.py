"""Loading a trained model for decoding from an `llm-jax train` workdir.

A training workdir looks like

    <workdir>/config.json                 the resolved run config (its `model` section is
                                          `ModelConfig.to_dict()`)
    <workdir>/tokenizer/                  the tokenizer
    <workdir>/checkpoints/<step>/         one `CheckpointManager` step: state/ (a
                                          `TrainState`), config/, tokenizer/, manifest

`load_checkpoint` accepts the workdir, its `checkpoints/` folder or one step folder. The
restore target is the abstract `TrainState` of the run's own model and optimizer (built by
`Trainer` on a one-device mesh without compiling anything), because the checkpoint manager
restores whole, verified trees; only the parameters are kept.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from llm_jax.data.tokenizer import Tokenizer, load_tokenizer

RUN_CONFIG = "config.json"
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A model restored from a training checkpoint, ready for `generate`.

    Attributes:
      model: the GPT or T5 model with the checkpoint's parameters.
      tokenizer: the tokenizer saved with the step (or the workdir's).
      step: the training step restored.
      run_config: the resolved run config (sections model, data, train, optimizer, ...).
      checkpoint_dir: the `checkpoints/` folder the step came from.
    """

    model: nnx.Module
    tokenizer: Tokenizer
    step: int
    run_config: dict[str, Any]
    checkpoint_dir: Path


def _is_step_dir(path: Path) -> bool:
    return path.name.isdigit() and (path / "state").is_dir()


def _has_steps(path: Path) -> bool:
    return any(_is_step_dir(child) for child in path.iterdir() if child.is_dir())


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, int | None]:
    """The `checkpoints/` folder behind `path` and the step it names (a step folder), if any.

    Raises:
      FileNotFoundError: `path` does not exist or holds no checkpoint step.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass the workdir of a training run (the folder with "
            f"{RUN_CONFIG} and {CHECKPOINTS}/), e.g. --checkpoint runs/tiny."
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file; pass the training workdir (a folder).")
    if _is_step_dir(path):
        return path.parent, int(path.name)
    if (path / CHECKPOINTS).is_dir():
        path = path / CHECKPOINTS
    if not _has_steps(path):
        raise FileNotFoundError(
            f"no checkpoint in {path}: expected step folders like {path}/100/state written by "
            "`llm-jax train`; train first (checkpoints are saved every train.checkpoint_every "
            "steps and at the end)."
        )
    return path, None


def _read_run_config(checkpoint_dir: Path, step: int) -> dict[str, Any]:
    """The run config saved with `step` (falling back to the workdir's config.json)."""
    candidates = [checkpoint_dir / str(step) / "config" / "metadata", checkpoint_dir.parent / RUN_CONFIG]
    for candidate in candidates:
        if candidate.is_file():
            config = json.loads(candidate.read_text(encoding="utf-8"))
            if isinstance(config, dict) and isinstance(config.get("model"), dict):
                return config
    raise FileNotFoundError(
        f"no run config for checkpoint step {step} in {checkpoint_dir}: looked for "
        f"{', '.join(str(c) for c in candidates)}; the workdir must come from `llm-jax train`."
    )


def load_checkpoint(path: str | Path, step: int | None = None) -> LoadedCheckpoint:
    """Restores the model parameters and tokenizer of a training checkpoint.

    Args:
      path: a training workdir, its `checkpoints/` folder, or one step folder in it.
      step: the step to restore; None takes the step folder named by `path`, else the
        latest step that passes verification.

    Returns:
      A `LoadedCheckpoint` whose model lives on the first device.

    Raises:
      FileNotFoundError: no such folder, no checkpoint, no run config or no tokenizer.
      ValueError: the step does not exist or fails verification, or the model is an
        encoder (BERT) that cannot generate.
    """
    # Imported here: training pulls in optax and the data pipeline, which `generate` alone
    # does not need.
    from llm_jax.checkpoint import CheckpointManager
    from llm_jax.models.config import ModelConfig
    from llm_jax.parallel.mesh import MeshConfig, make_mesh
    from llm_jax.train.optimizer import OptimizerConfig
    from llm_jax.train.trainer import Trainer

    checkpoint_dir, named_step = resolve_checkpoint_dir(path)
    step = named_step if step is None else step
    with CheckpointManager(checkpoint_dir) as manager:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no complete checkpoint in {checkpoint_dir} (steps found: "
                    f"{manager.all_steps()}); wait for the run to save one or train again."
                )
        elif step not in manager.all_steps():
            raise ValueError(
                f"no checkpoint step {step} in {checkpoint_dir}; it has steps "
                f"{manager.all_steps()} (leave --step out for the latest)."
            )
        run_config = _read_run_config(checkpoint_dir, step)
        model_config = ModelConfig.from_dict(run_config["model"])
        if model_config.family not in ("gpt", "t5"):
            raise ValueError(
                f"checkpoint {checkpoint_dir} holds a {model_config.family} model, an encoder "
                "that does not generate text; sample from a gpt or t5 run."
            )
        trainer = Trainer(
            model_config,
            OptimizerConfig(**run_config.get("optimizer", {})),
            make_mesh(MeshConfig(), jax.devices()[:1]),
            total_steps=int(run_config.get("train", {}).get("steps", 1)),
            objective=run_config.get("data", {}).get("objective", "clm"),
        )
        restored = manager.restore(trainer.abstract_state, step=step)
        tokenizer_dir = restored.tokenizer_dir
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        tokenizer_dir = checkpoint_dir.parent / "tokenizer"
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(
            f"checkpoint step {step} in {checkpoint_dir} has no tokenizer and neither does "
            f"{checkpoint_dir.parent}; copy the run's tokenizer folder to {tokenizer_dir}."
        )
    model = nnx.merge(trainer.graphdef, restored.state.params)
    return LoadedCheckpoint(
        model=model,
        tokenizer=load_tokenizer(tokenizer_dir),
        step=restored.step,
        run_config=run_config,
        checkpoint_dir=checkpoint_dir,
    )
