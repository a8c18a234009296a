"""Run configuration: YAML files in `configs/` plus dotted `key=value` overrides.

A run config has the sections `model` (ModelConfig, optionally `preset:`), `data`
(DataConfig), `train` (TrainConfig), `optimizer` (OptimizerConfig), `mesh` (MeshConfig),
`distributed`, `init` and `finetune` (a base model to start from, and what of it trains:
`llm_jax.finetune.config`), plus top-level `name` and `workdir`. With `init`, the `model`
section is optional and may only change the fields that keep the base's weights valid.
Every section is a frozen dataclass; unknown keys and bad values fail at load time with the
valid choices named. YAML is read with a `yaml.SafeLoader` subclass (safe: no code runs)
that also reads `1e-3` as a float. A `prune` section turns on gradual magnitude pruning
(`llm_jax.compress.prune`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, ClassVar

import yaml

from llm_jax.compress.prune import PruneConfig
from llm_jax.config import Config, at_least, in_interval, nearest_first, one_of
from llm_jax.data.config import DataConfig
from llm_jax.finetune.config import FinetuneConfig, InitConfig
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
class TrainConfig(Config):
    """The training loop."""

    section: ClassVar[str] = "train"

    steps: int = 200
    seed: int = 0
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic evaluation
    eval_batches: int = 8
    # seq2seq: beam-search the validation sources and score BLEU/chrF at the run's end, and
    # also at every evaluation when eval_generate is true (see train.task_eval).
    eval_generate: bool = False
    eval_generate_examples: int = 64  # 0 turns the decoding off
    eval_beams: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    on_nonfinite: str = "stop"  # stop the run, or skip the update and go on
    progress: bool = True
    # Distillation (llm_jax.compress.distill): a teacher folder (ours or Hugging Face) turns
    # it on; loss = alpha T^2 KL + (1 - alpha) CE (+ cosine x hidden-state cosine), or the
    # DistilBERT preset's 5.0 / 2.0 / 1.0; distill_init=alternate starts the student from
    # every other teacher layer.
    teacher: str | None = None
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    distill_cosine: float = 0.0
    distill_preset: str = "none"
    distill_init: str = "none"

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "grad_accum_steps",
            "log_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_beams",
        ):
            at_least(self, name, 1)
        at_least(self, "eval_every", 0, note="0 disables")
        at_least(self, "eval_generate_examples", 0, note="0 disables")
        one_of(self, "on_nonfinite", NONFINITE)
        in_interval(self, "label_smoothing", 0, 1, high_open=True)
        at_least(self, "z_loss", 0)
        in_interval(self, "distill_alpha", 0, 1)
        at_least(self, "distill_temperature", 0, strict=True)
        at_least(self, "distill_cosine", 0)
        one_of(self, "distill_preset", ("none", "distilbert"))
        one_of(self, "distill_init", ("none", "alternate"))
        if self.distill_init != "none" and not self.teacher:
            raise ValueError("train.distill_init starts from a teacher: set train.teacher too.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig(Config):
    """Multi-host setup; all None reads JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID, and a single process needs nothing."""

    section: ClassVar[str] = "distributed"

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunConfig(Config):
    """A whole run. `model` stays a mapping until the tokenizer is known: a missing
    `vocab_size` is filled with the tokenizer's (see `model_config`)."""

    name: str
    workdir: str
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    init: InitConfig = dataclasses.field(default_factory=InitConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    prune: PruneConfig = dataclasses.field(default_factory=PruneConfig)

    def __post_init__(self) -> None:
        if self.init.source:
            # The architecture is the base's; `finetune_model_config` checks the changes
            # when the base is read.
            ModelConfig.check_keys(self.model)
            return
        ft = self.finetune
        if ft.method != "full" or ft.trainable not in ("auto", "all"):
            raise ValueError(
                f"finetune.method={ft.method}, trainable={ft.trainable} fine-tunes a base "
                "model: set init.from_checkpoint=RUN_DIR or init.from_hf=HF_FOLDER."
            )
        if not self.model:
            raise ValueError(
                "a 'model' section (e.g. 'preset: gpt2-tiny') is required, or init.from_* "
                "to start from a base model."
            )
        # The tokenizer, and with it the final vocab_size, exists only once the run starts, so
        # the model section is checked now with the size the data section asks for. A char
        # tokenizer's size is known only after it reads the corpus; no check reads vocab_size
        # beyond >= 1, so the byte count stands in.
        model = self.model_config(self.data.vocab_size or 256)
        if model.position in ("learned", "sinusoidal"):  # a table with one row per position
            lengths = ("seq_len", "target_seq_len") if model.family == "t5" else ("seq_len",)
            for name in lengths:
                length = getattr(self.data, name)
                if length is not None and length > model.max_position_embeddings:
                    raise ValueError(
                        f"data.{name}={length} is longer than model.max_position_embeddings="
                        f"{model.max_position_embeddings} ({model.position} positions); lower "
                        f"data.{name} or raise model.max_position_embeddings."
                    )

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig. Unless the config sets `model.vocab_size` itself, the
        tokenizer's `vocab_size` is used (a preset's own vocabulary size is replaced)."""
        d = dict(self.model)
        if "vocab_size" not in d and vocab_size is not None:
            d["vocab_size"] = vocab_size
        return ModelConfig.from_dict(d)


TOP_LEVEL = tuple(RunConfig.field_names())


def _yaml_error(e: yaml.YAMLError, where: str, column_offset: int = 0) -> ValueError:
    """One line naming where the YAML is malformed (PyYAML's own text spans several)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    at = "" if mark is None else f", line {mark.line + 1}, column {mark.column + 1 + column_offset}"
    context = f" ({context})" if context else ""
    return ValueError(f"{where}{at}: malformed YAML: {problem}{context}")


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML: 3, 1e-3, true, [1, 2], text)."""
    d = dict(d)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value.")
        key, raw = item.split("=", 1)
        try:
            value = _yaml(raw) if raw else None
        except yaml.YAMLError as e:
            raise _yaml_error(e, f"override {item!r}", column_offset=len(key) + 1) from None
        parts = key.strip().split(".")
        if parts[0] not in TOP_LEVEL:
            raise ValueError(
                f"override {key!r}: unknown section {parts[0]!r}; valid: "
                f"{nearest_first([parts[0]], TOP_LEVEL)}."
            )
        node = d
        for p in parts[:-1]:
            child = node.get(p)
            node[p] = dict(child) if isinstance(child, dict) else {}
            node = node[p]
        node[parts[-1]] = value
    return d


def _without_records(d: dict[str, Any]) -> dict[str, Any]:
    """`d` less what a run writes into its config.json to check on resume (the base's
    `init.fingerprint`, the distillation `teacher` record): they are not settings, and a
    run's config.json must load back as a config (the run re-checks them itself)."""
    d = {k: v for k, v in d.items() if not (k == "teacher" and isinstance(v, dict))}
    if isinstance(d.get("init"), dict) and "fingerprint" in d["init"]:
        d["init"] = {k: v for k, v in d["init"].items() if k != "fingerprint"}
    return d


def config_from_dict(d: dict[str, Any], *, source: str = "<dict>") -> RunConfig:
    """Validate and build a RunConfig from a mapping (the YAML's content)."""
    if not isinstance(d, dict):
        raise ValueError(f"{source}: the top level must be a mapping of sections.")
    d = _without_records(d)
    try:
        RunConfig.check_keys(d)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    has_init = isinstance(d.get("init"), dict) and any(
        d["init"].get(k) for k in ("from_checkpoint", "from_hf")
    )
    if not isinstance(d.get("model"), dict) and not (has_init and d.get("model") is None):
        raise ValueError(
            f"{source}: a 'model' section (e.g. 'preset: gpt2-tiny') is required, or "
            "init.from_checkpoint / init.from_hf to start from a base model."
        )
    name = str(d.get("name") or Path(source).stem)
    workdir = str(d.get("workdir") or os.path.join("runs", name))
    return RunConfig.from_dict(
        {**d, "model": d.get("model") or {}, "name": name, "workdir": workdir}
    )


def check_data_paths(cfg: RunConfig) -> None:
    """Raise ValueError naming the first `data.paths` / `validation_paths` / `test_paths` entry that
    does not exist (relative to the working directory, where runs read them)."""
    for key in ("paths", "validation_paths", "test_paths"):
        for path in getattr(cfg.data, key):
            if not Path(path).exists():
                raise ValueError(
                    f"data.{key}: {path} not found (relative paths are read from "
                    f"{os.getcwd()!r}); set data.{key}=[your corpus], e.g. "
                    f"data.{key}=[my_text.txt] or a folder."
                )


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply dotted overrides and check that the corpus exists."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; see the configs/ folder.")
    try:
        d = _yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise _yaml_error(e, str(path)) from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections.")
    cfg = config_from_dict(apply_overrides(d, overrides or []), source=str(path))
    check_data_paths(cfg)
    return cfg
