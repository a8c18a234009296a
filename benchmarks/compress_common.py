"""What benchmarks/prune.py and benchmarks/distill.py share: train a run with `llm-jax
train`, held-out loss of any model on one fixed set of validation batches, greedy decode
speed, and a run config for another model on the same data and tokenizer."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
_EVAL_STEPS: dict[Any, Any] = {}  # (model config, objective) -> jitted eval step


def train_cli(config: Path, workdir: Path, *overrides: str) -> Path:
    """`llm-jax train CONFIG workdir=WORKDIR ...` unless that run already finished."""
    cmd = [sys.executable, "-m", "llm_jax.cli", "train", str(config), f"workdir={workdir}"]
    cmd += ["train.progress=false", *overrides]
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return workdir


def run_config(base_yaml: Path, run_dir: Path, workdir: Path, **sections: dict) -> dict:
    """The YAML's config with the data (and tokenizer) of `run_dir`, `workdir`, and the
    given sections merged in (a section set to None is removed)."""
    d = yaml.safe_load(base_yaml.read_text())
    d = copy.deepcopy(d)
    d["workdir"] = str(workdir)
    d["data"] = {**d.get("data", {}), "tokenizer_path": str(run_dir / "tokenizer")}
    for key, value in sections.items():
        if value is None:
            d.pop(key, None)
        else:
            d[key] = {**(d.get(key) or {}), **value}
    return d


def train_dict(d: dict) -> Path:
    """Train in this process (for configs that are easier to build as a dict)."""
    from llm_jax.train.config import config_from_dict
    from llm_jax.train.loop import train

    return train(config_from_dict(d)).workdir


def heldout_batches(run_dir: Path, n: int) -> list[dict[str, np.ndarray]]:
    """The run's first `n` validation batches (host arrays), the same for every model."""
    import json

    from llm_jax.data.config import DataConfig
    from llm_jax.parallel.mesh import MeshConfig, make_mesh
    from llm_jax.train import data as train_data

    config = json.loads((run_dir / "config.json").read_text())
    data = train_data.prepare(DataConfig.from_dict(config["data"]), run_dir)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    return [jax.device_get(b) for b in data.eval_batches(mesh, n)]


def heldout(model: nnx.Module, batches: list[dict], objective: str = "clm") -> dict[str, float]:
    """Mean held-out loss and perplexity of `model` over `batches`."""
    from llm_jax.train.step import make_eval_step

    graphdef, state = nnx.split(model)
    key = (model.cfg, objective)
    if key not in _EVAL_STEPS:  # one compile per architecture, not per pruned copy
        _EVAL_STEPS[key] = jax.jit(make_eval_step(graphdef, objective))
    step = _EVAL_STEPS[key]
    params = nnx.to_pure_dict(state)
    total = count = 0.0
    for batch in batches:
        s, c = next(iter(jax.device_get(step(params, batch)).values()))
        total, count = total + float(s), count + float(c)
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


def decode_speeds(models: dict[str, nnx.Module], repeats: int = 7, new_tokens: int = 64):
    """{name: greedy batch-1 tokens/s} (16-token prompt): after a cold call each, the models'
    calls alternate (a, b, ..., a, b, ...) so load from other processes falls on all alike;
    the best of `repeats` calls each."""
    from llm_jax import sample

    prompt = np.arange(1, 17, dtype=np.int32)[None]
    decoders = {name: sample.as_decoder(m) for name, m in models.items()}

    def call(decoder):
        out = sample.generate(decoder, prompt, max_new_tokens=new_tokens)
        return jax.device_get(out.tokens)

    for decoder in decoders.values():
        call(decoder)
    best = dict.fromkeys(decoders, math.inf)
    for _ in range(repeats):
        for name, decoder in decoders.items():
            t = time.perf_counter()
            call(decoder)
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: new_tokens / t for name, t in best.items()}


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of `rows`."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
