"""Finding one verified checkpoint step from a path a user types, without side effects.

A path may name a training run's workdir (`<run>/checkpoints/<step>/...`), a checkpoint
workdir (the folder of numbered steps, e.g. one written by `llm-jax convert --to`), or one
step folder. `locate` picks the step (the newest that passes its checksum manifest, or the
one asked for) and returns a `StepRef`.

Read-only by design: no orbax `CheckpointManager` is opened, because one cleans up
temporary step folders on start, which would destroy a running job's in-flight save when
`llm-jax sample` reads its workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

from llm_jax.checkpoint.manager import CheckpointIntegrityWarning
from llm_jax.checkpoint.manifest import verify_step_dir

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"
_WHAT = (
    "pass a training workdir (the folder with config.json and checkpoints/), its "
    "checkpoints/ folder, one step folder, or a checkpoint written by `llm-jax convert --to`"
)


@dataclasses.dataclass(frozen=True)
class StepRef:
    """One verified checkpoint step.

    Attributes:
      root: the checkpoint workdir (the folder of numbered steps).
      step: the step.
    """

    root: Path
    step: int

    @property
    def dir(self) -> Path:
        """The step folder."""
        return self.root / str(self.step)

    def config(self) -> dict[str, Any]:
        """The config saved with the step (a training run's resolved config, or
        `{"model": ...}` for a converted model); {} when none was saved."""
        path = self.dir / "config" / "metadata"
        return json.loads(path.read_text()) if path.is_file() else {}

    def tokenizer_dir(self) -> Path | None:
        """The step's copy of the tokenizer folder, else the training workdir's own
        `tokenizer/` beside `checkpoints/`, or None."""
        for path in (self.dir / TOKENIZER, self.root.parent / TOKENIZER):
            if path.is_dir():
                return path
        return None


def _is_step_dir(path: Path) -> bool:
    return path.name.isdigit() and path.is_dir()


def step_numbers(root: Path) -> list[int]:
    """The committed step folders of a checkpoint workdir, ascending (orbax's temporary
    `<step>.orbax-checkpoint-tmp` folders are not steps)."""
    return sorted(int(p.name) for p in root.iterdir() if _is_step_dir(p))


def _checked(root: Path, step: int) -> StepRef:
    check = verify_step_dir(root / str(step), step)
    if not check.ok:
        raise ValueError(
            f"checkpoint step {step} in {root} {check.reason}; pick another step (leave the "
            "step out for the newest good one)."
        )
    return StepRef(root, step)


def _newest_good(root: Path, steps: list[int]) -> StepRef:
    bad = []
    for step in reversed(steps):
        check = verify_step_dir(root / str(step), step)
        if check.ok:
            for b, reason in bad:
                warnings.warn(
                    f"checkpoint step {b} in {root} is corrupted or unverified: it {reason}; "
                    f"falling back to step {step}",
                    CheckpointIntegrityWarning,
                    stacklevel=3,
                )
            return StepRef(root, step)
        bad.append((step, check.reason))
    detail = "; ".join(f"step {s} {reason}" for s, reason in bad)
    raise ValueError(f"no checkpoint in {root} passes verification: {detail}.")


def locate(path: str | os.PathLike, step: int | None = None) -> StepRef:
    """The verified checkpoint step that `path` (and `step`) name.

    Args:
      path: a training run's workdir, its `checkpoints/` folder, a checkpoint workdir, or
        one step folder.
      step: the step to take; None takes the step folder `path` names, else the newest
        step that passes verification (newer corrupted steps are skipped with a
        `CheckpointIntegrityWarning`).

    Returns:
      A `StepRef` to a step whose files match its checksum manifest.

    Raises:
      FileNotFoundError: `path` does not exist or holds no checkpoint step.
      ValueError: the step asked for is absent or fails verification, or no step verifies.
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: it does not exist; {_WHAT}.")
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: it is a file; {_WHAT}.")
    if _is_step_dir(path) and (path / "state").is_dir():
        root, named = path.parent, int(path.name)
    else:
        root, named = path, None
        if (path / CHECKPOINTS).is_dir() and not step_numbers(path):
            root = path / CHECKPOINTS
    steps = step_numbers(root)
    if not steps:
        raise FileNotFoundError(
            f"no checkpoint in {root}: no verified checkpoint step (folders like "
            f"{root}/100/state); {_WHAT}. A training run saves every train.checkpoint_every "
            "steps and at the end."
        )
    step = named if step is None else step
    if step is None:
        return _newest_good(root, steps)
    if step not in steps:
        raise ValueError(
            f"no checkpoint step {step} in {root}; it has steps {steps} (leave the step out "
            "for the newest good one)."
        )
    return _checked(root, step)
