"""The base model of a fine-tuning run: read it, derive the fine-tuned model config, and
start the parameters from it.

    base = load_base(cfg.init)                                 # config, params, tokenizer
    model_cfg = finetune_model_config(base.config, cfg.model, cfg.finetune)
    start = start_params(model_cfg, base.params, seed=0)       # base + fresh new leaves

A base is one of our checkpoints (a run, checkpoint or step folder, read by
`convert.restore_model`) or a Hugging Face folder (read by `convert.load_hf_params`). Its
`fingerprint` (the SHA-256 of the step's checksum manifest, or of the HF weight files)
goes into the run's saved config, so that a resumed run or a restored model can check
that it reads the same base again: a fine-tuning checkpoint holds only what trained.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from llm_jax.convert.hf_weights import flatten_tree, unflatten_tree
from llm_jax.finetune.config import FinetuneConfig, InitConfig
from llm_jax.models import build
from llm_jax.models.config import ModelConfig

# ModelConfig fields a fine-tuning run may change: they keep every base weight valid
# (compute/storage dtype, regularisation, the program) or add/drop a head.
MAY_CHANGE = (
    "dtype",
    "param_dtype",
    "dropout_rate",
    "attention_dropout_rate",
    "remat_policy",
    "scan_layers",
    "num_labels",
    "use_pooler",
    "use_mlm_head",
    "use_nsp",
)
HEAD_FIELDS = ("num_labels", "use_pooler", "use_mlm_head", "use_nsp")


@dataclasses.dataclass(frozen=True)
class Base:
    """A base model read from disk.

    Attributes:
      source: the folder as given (absolute).
      kind: "checkpoint" (ours) or "hf".
      config: its model config.
      params: its parameters, a nested dict of NumPy arrays.
      tokenizer_dir: the folder its tokenizer is read from (None: it has none).
      fingerprint: SHA-256 of what was read (see the module docstring).
      step: the checkpoint step read (None for HF).
    """

    source: str
    kind: str
    config: ModelConfig
    params: dict[str, Any]
    tokenizer_dir: Path | None
    fingerprint: str
    step: int | None = None

    def reference(self) -> dict[str, Any]:
        """What a run records of its base: enough to read and check it again."""
        key = "from_checkpoint" if self.kind == "checkpoint" else "from_hf"
        return {key: self.source, "step": self.step, "fingerprint": self.fingerprint}


def _sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _hf_fingerprint(folder: Path) -> str:
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
    return _sha256([f for f in files if f.is_file()])


def load_base(init: InitConfig) -> Base:
    """Read the base model `init` names.

    Raises:
      ValueError: the folder is not a model (says what a base folder holds).
    """
    from llm_jax.checkpoint.manifest import MANIFEST_NAME
    from llm_jax.convert import load_hf_params, restore_model
    from llm_jax.convert.hf import params_of

    if init.from_hf:
        folder = Path(init.from_hf).absolute()
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"init.from_hf={init.from_hf}: no config.json there; give a Hugging Face model "
                "folder (config.json + model.safetensors), or use init.from_checkpoint for one "
                "of our runs."
            )
        cfg, params = load_hf_params(folder)
        return Base(str(folder), "hf", cfg, params, folder, _hf_fingerprint(folder))
    try:
        restored = restore_model(init.from_checkpoint, init.step)
    except FileNotFoundError as e:
        raise ValueError(
            f"init.from_checkpoint={init.from_checkpoint}: {e} Give a run folder of ours (with "
            "checkpoints/), a checkpoint folder or one step folder; a Hugging Face folder goes "
            "in init.from_hf."
        ) from None
    params = jax.tree.map(np.asarray, params_of(restored.model))
    manifest = restored.step_dir / MANIFEST_NAME
    fingerprint = _sha256([manifest]) if manifest.is_file() else ""
    return Base(
        str(Path(init.from_checkpoint).absolute()),
        "checkpoint",
        restored.model.cfg,
        params,
        restored.tokenizer_dir,
        fingerprint,
        restored.step,
    )


def finetune_model_config(
    base: ModelConfig, model_section: Mapping[str, Any], finetune: FinetuneConfig
) -> ModelConfig:
    """The fine-tuned model's config: the base's, with the `model:` section's changes (only
    `MAY_CHANGE` fields may differ) and the method's fields (LoRA, prompt length).

    Raises:
      ValueError: a `model:` key that would invalidate the base weights (named).
    """
    section = dict(model_section)
    if "preset" in section:
        raise ValueError(
            "model.preset: with init.from_* the architecture comes from the base; remove "
            "model.preset (the model section may only change "
            f"{', '.join(MAY_CHANGE)})."
        )
    ModelConfig.check_keys(section)
    base_dict = base.to_dict()
    cfg = ModelConfig.from_dict({**base_dict, **section})
    changed = [k for k in section if getattr(cfg, k) != getattr(base, k) and k not in MAY_CHANGE]
    if changed:
        k = changed[0]
        raise ValueError(
            f"model.{k}={section[k]!r} differs from the base model's {getattr(base, k)!r}, which "
            f"would not fit its weights; remove model.{k} (with init.from_* the model section "
            f"may only change {', '.join(MAY_CHANGE)})."
        )
    if finetune.method == "lora" and not finetune.lora_from:  # an adapter brings its own
        cfg = cfg.replace(
            lora_rank=finetune.lora_rank,
            lora_alpha=finetune.lora_alpha,
            lora_dropout=finetune.lora_dropout,
            lora_targets=tuple(finetune.lora_targets),
        )
    elif finetune.method == "prompt_tuning":
        cfg = cfg.replace(prompt_length=finetune.prompt_length)
    return cfg


@dataclasses.dataclass(frozen=True)
class Start:
    """The starting parameters of a fine-tuning run.

    Attributes:
      params: nested dict of NumPy arrays: the base's where it has them, else fresh.
      new: paths initialised fresh (new heads, adapters, the prompt).
      dropped: base paths the fine-tuned model does not have (heads turned off).
      reinitialised: base heads whose shape changed (e.g. num_labels), started fresh.
    """

    params: dict[str, Any]
    new: tuple[str, ...]
    dropped: tuple[str, ...]
    reinitialised: tuple[str, ...]

    @property
    def fresh(self) -> tuple[str, ...]:
        """Every parameter not taken from the base: these always train."""
        return self.new + self.reinitialised

    def report(self) -> list[str]:
        """Lines for the start banner naming every parameter not taken from the base."""
        lines = []
        for what, paths in (
            ("new (initialised fresh)", self.new),
            ("re-initialised (shape changed)", self.reinitialised),
            ("base parameters not used (heads turned off)", self.dropped),
        ):
            if paths:
                lines.append(f"{what}: {', '.join(paths)}")
        return lines


def start_params(
    cfg: ModelConfig, base_params: Mapping[str, Any], *, seed: int, base_cfg: ModelConfig
) -> Start:
    """Fresh parameters of `cfg` with every base parameter copied in (cast to
    `cfg.param_dtype`).

    Raises:
      ValueError: a base parameter the model has with another shape (not a head), or a
        base parameter the model lacks without a head field explaining it.
    """
    fresh = nnx.to_pure_dict(nnx.state(build(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
    flat = {k: np.asarray(v) for k, v in flatten_tree(fresh).items()}
    have = flatten_tree(base_params)
    used, new, reinit = set(), [], []
    # A fine-tuned model keeps the base's parameter paths; adapters and heads add leaves.
    for path, x in flat.items():
        if path not in have:
            new.append(path)
            continue
        used.add(path)
        if tuple(have[path].shape) == x.shape:
            flat[path] = np.asarray(have[path], x.dtype)
        elif path.split("/")[0] in ("classifier", "nsp_head"):
            reinit.append(path)
        else:
            raise ValueError(
                f"the base's {path} has shape {tuple(have[path].shape)} but the fine-tuned "
                f"model's is {x.shape}; the model section changed its size."
            )
    dropped = sorted(set(have) - used)
    heads_off = [k for k in HEAD_FIELDS if getattr(cfg, k) != getattr(base_cfg, k)]
    if dropped and not heads_off:
        raise ValueError(
            f"the fine-tuned model has no place for the base parameters {dropped[:6]}; "
            "this base does not fit the model config."
        )
    return Start(unflatten_tree(flat), tuple(new), tuple(dropped), tuple(reinit))


def check_fingerprint(
    reference: Mapping[str, Any],
    base: Base,
    *,
    what: str = "the base model",
    fix: str = "the checkpoint holds only what trained, so it needs the same base: restore "
    "that folder.",
) -> None:
    """ValueError unless `base` is the model a run recorded (its fingerprint).

    Args:
      reference: what the run recorded (`Base.reference()`).
      base: the model read now.
      what, fix: the error's name for the model and its advice (a distillation run checks
        its teacher with this too).
    """
    want = reference.get("fingerprint")
    if want and base.fingerprint and want != base.fingerprint:
        raise ValueError(
            f"{what} at {base.source} changed since this run started (fingerprint "
            f"{base.fingerprint[:12]} != recorded {want[:12]}); {fix}"
        )


def base_from_reference(reference: Mapping[str, Any]) -> Base:
    """Read the base a run recorded (`Base.reference()`) and check its fingerprint."""
    init = InitConfig(
        from_checkpoint=reference.get("from_checkpoint"),
        from_hf=reference.get("from_hf"),
        step=reference.get("step") if reference.get("from_checkpoint") else None,
    )
    if not os.path.exists(init.source or ""):
        raise ValueError(
            f"this fine-tuning run was started from {init.source}, which is gone; the "
            "checkpoint holds only what trained. Put the base back at that path."
        )
    base = load_base(init)
    check_fingerprint(reference, base)
    return base
