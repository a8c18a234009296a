"""Run configuration: YAML files in `configs/` plus dotted `key=value` overrides.

A run config has the sections `model` (ModelConfig, optionally `preset:`), `data`
(DataConfig), `train` (TrainConfig), `optimizer` (OptimizerConfig), `mesh` (MeshConfig),
`distributed`, plus top-level `name` and `workdir`. Every section is a frozen dataclass;
unknown keys and bad values fail at load time with the valid choices named. YAML is read
with a `yaml.SafeLoader` subclass (safe: no code runs) that also reads `1e-3` as a float.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml

from llm_jax.data.config import DataConfig
from llm_jax.models.config import ModelConfig
from llm_jax.parallel.mesh import MeshConfig
from llm_jax.train.optimizer import OptimizerConfig

NONFINITE = ("stop", "skip")


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also reads 1e-3 and 3E5 as floats (YAML 1.1 needs a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop."""

    steps: int = 200
    seed: int = 0
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation
    eval_batches: int = 8
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    on_nonfinite: str = "stop"  # stop the run, or skip the update and go on
    progress: bool = True

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "grad_accum_steps",
            "log_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1.")
        if self.eval_every < 0:
            raise ValueError(f"train.eval_every={self.eval_every} must be >= 0 (0 disables).")
        if self.on_nonfinite not in NONFINITE:
            raise ValueError(
                f"train.on_nonfinite={self.on_nonfinite!r} is not one of {list(NONFINITE)}."
            )
        if not 0.0 <= self.label_smoothing < 1.0 or self.z_loss < 0:
            raise ValueError("train.label_smoothing must be in [0, 1) and train.z_loss >= 0.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Multi-host setup; all None reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, and a single process needs nothing."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


SECTIONS = {
    "data": DataConfig,
    "train": TrainConfig,
    "optimizer": OptimizerConfig,
    "mesh": MeshConfig,
    "distributed": DistributedConfig,
}
TOP_LEVEL = ("name", "workdir", "model", *SECTIONS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run. `model` stays a mapping until the tokenizer is known: a missing
    `vocab_size` is filled with the tokenizer's (see `model_config`)."""

    name: str
    workdir: str
    model: dict[str, Any]
    data: DataConfig
    train: TrainConfig
    optimizer: OptimizerConfig
    mesh: MeshConfig
    distributed: DistributedConfig

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig. Unless the config sets `model.vocab_size` itself, the
        tokenizer's `vocab_size` is used (a preset's own vocabulary size is replaced)."""
        d = dict(self.model)
        if "vocab_size" not in d:
            if vocab_size is not None:
                d["vocab_size"] = vocab_size
            elif "preset" not in d:
                d["vocab_size"] = 1  # placeholder to validate the other fields early
        return ModelConfig.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "workdir": self.workdir, "model": dict(self.model)}
        for key in SECTIONS:
            out[key] = dataclasses.asdict(getattr(self, key))
        return out


def _section(cls, name: str, d: Any):
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"config section {name!r} must be a mapping; got {d!r}.")
    if hasattr(cls, "from_dict"):
        return cls.from_dict(d)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(valid))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in section {name!r}; valid keys are {valid}.")
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in d.items():
        kinds = set(re.findall(r"\b(int|float)\b", str(hints[key]).split("[")[0]))
        if not kinds or value is None:
            continue
        if isinstance(value, float) and kinds == {"int"} and value.is_integer():
            d = {**d, key: int(value)}  # `1e3` from YAML or an override
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}.{key}={value!r} must be a number ({hints[key]}).")
        elif kinds == {"int"} and not isinstance(value, int):
            raise ValueError(f"{name}.{key}={value!r} must be a whole number ({hints[key]}).")
    try:
        return cls(**d)
    except TypeError as e:
        raise ValueError(f"section {name!r}: {e}") from None


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML: 3, 1e-3, true, [1, 2], text)."""
    d = dict(d)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value.")
        key, raw = item.split("=", 1)
        value = _yaml(raw) if raw else None
        parts = key.strip().split(".")
        if parts[0] not in TOP_LEVEL:
            raise ValueError(
                f"override {key!r}: unknown section {parts[0]!r}; valid: {list(TOP_LEVEL)}."
            )
        node = d
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return d


def config_from_dict(d: dict[str, Any], *, source: str = "<dict>") -> RunConfig:
    """Validate and build a RunConfig from a mapping (the YAML's content)."""
    unknown = sorted(set(d) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {unknown}; valid: {list(TOP_LEVEL)}.")
    model = d.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{source}: a 'model' section (e.g. 'preset: gpt2-tiny') is required.")
    name = str(d.get("name") or Path(source).stem)
    cfg = RunConfig(
        name=name,
        workdir=str(d.get("workdir") or os.path.join("runs", name)),
        model=dict(model),
        **{key: _section(cls, key, d.get(key)) for key, cls in SECTIONS.items()},
    )
    cfg.model_config()  # validates the model section now, before any work
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and apply dotted overrides."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; see the configs/ folder.")
    d = _yaml(path.read_text(encoding="utf-8")) or {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections.")
    return config_from_dict(apply_overrides(d, overrides or []), source=str(path))
