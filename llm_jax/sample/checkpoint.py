"""Finding and loading a model to decode from: our checkpoints and Hugging Face folders.

A training workdir looks like

    <workdir>/config.json                 the resolved run config (its `model` section is
                                          `ModelConfig.to_dict()`)
    <workdir>/tokenizer/                  the tokenizer
    <workdir>/checkpoints/<step>/         one `CheckpointManager` step: state/ (a
                                          `TrainState`), config/, tokenizer/, manifest

and `llm-jax convert --from-hf DIR --to CKPT` writes `CKPT/0/` with the same items (state
`{"params": ...}`). `load_checkpoint` accepts a workdir, its `checkpoints/` folder, a
converted checkpoint folder or one step folder, picks the step (the latest that verifies,
or the one asked for) and restores only the parameters through `lj.convert.restore_model`
(an orbax partial restore: the optimizer state is never read).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flax import nnx

from llm_jax.data.tokenizer import Tokenizer

RUN_CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A model ready for `generate`, with its tokenizer.

    Attributes:
      model: the GPT or T5 model.
      tokenizer: the tokenizer saved with the step (or the workdir's, or the HF folder's).
      step: the checkpoint step restored; None for a Hugging Face folder.
      run_config: the saved config: a training run's resolved config (sections model,
        data, train, ...), `{"model": ...}` for a converted checkpoint, {} for HF.
      source: the step folder or Hugging Face folder the model came from.
    """

    model: nnx.Module
    tokenizer: Tokenizer
    step: int | None
    run_config: dict[str, Any]
    source: Path


def _is_step_dir(path: Path) -> bool:
    return path.name.isdigit() and (path / "state").is_dir()


def _has_steps(path: Path) -> bool:
    return any(_is_step_dir(child) for child in path.iterdir() if child.is_dir())


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, int | None]:
    """The folder of numbered steps behind `path`, and the step it names (a step folder).

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
            "`llm-jax train` (or `llm-jax convert --to`); train first (checkpoints are saved "
            "every train.checkpoint_every steps and at the end)."
        )
    return path, None


def _pick_step(checkpoint_dir: Path, step: int | None) -> int:
    from llm_jax.checkpoint import CheckpointManager

    with CheckpointManager(checkpoint_dir) as manager:
        steps = manager.all_steps()
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no complete checkpoint in {checkpoint_dir} (steps found: {steps}); "
                    "wait for the run to save one or train again."
                )
        elif step not in steps:
            raise ValueError(
                f"no checkpoint step {step} in {checkpoint_dir}; it has steps {steps} "
                "(leave --step out for the latest)."
            )
    return step


def _check_generates(model: nnx.Module, where: Path) -> None:
    family = model.cfg.family
    if family not in ("gpt", "t5"):
        raise ValueError(
            f"{where} holds a {family} model, an encoder that does not generate text; "
            "sample from a gpt or t5 model."
        )


def load_checkpoint(path: str | Path, step: int | None = None) -> LoadedCheckpoint:
    """Restores the parameters and tokenizer of one of our checkpoints.

    Args:
      path: a training workdir, its `checkpoints/` folder, a converted checkpoint folder,
        or one step folder.
      step: the step to restore; None takes the step folder named by `path`, else the
        latest step that passes verification.

    Returns:
      A `LoadedCheckpoint` whose model lives on the first device.

    Raises:
      FileNotFoundError: no such folder, no checkpoint or no tokenizer.
      ValueError: the step does not exist or fails verification, or the model is an
        encoder (BERT) that cannot generate.
    """
    from llm_jax.convert import load_hf_tokenizer, restore_model

    checkpoint_dir, named_step = resolve_checkpoint_dir(path)
    step = _pick_step(checkpoint_dir, named_step if step is None else step)
    step_dir = checkpoint_dir / str(step)
    restored = restore_model(step_dir)
    _check_generates(restored.model, step_dir)
    candidates = [restored.tokenizer_dir, checkpoint_dir.parent / TOKENIZER]
    tokenizer_dir = next((d for d in candidates if d is not None and Path(d).is_dir()), None)
    if tokenizer_dir is None:
        raise FileNotFoundError(
            f"checkpoint step {step} in {checkpoint_dir} has no tokenizer and neither does "
            f"{checkpoint_dir.parent}; copy the run's tokenizer folder to "
            f"{checkpoint_dir.parent / TOKENIZER}."
        )
    return LoadedCheckpoint(
        model=restored.model,
        tokenizer=load_hf_tokenizer(tokenizer_dir),
        step=step,
        run_config=restored.config,
        source=step_dir,
    )


def load_hf_folder(path: str | Path) -> LoadedCheckpoint:
    """A Hugging Face model folder (config.json + safetensors + tokenizer files).

    Raises:
      FileNotFoundError: no such folder, or no weights / tokenizer in it.
      ValueError: an unsupported architecture, or an encoder that cannot generate.
    """
    from llm_jax.convert import load_hf, load_hf_tokenizer

    source = Path(path).expanduser().absolute()
    if not source.is_dir():
        raise FileNotFoundError(
            f"{source} is not a folder; pass a Hugging Face model folder (config.json, "
            "model.safetensors and the tokenizer files), e.g. one saved by save_pretrained."
        )
    model = load_hf(source)
    _check_generates(model, source)
    return LoadedCheckpoint(
        model=model, tokenizer=load_hf_tokenizer(source), step=None, run_config={}, source=source
    )
