"""Pruning figures on the tiny run (configs/tiny.yaml):

1. Unstructured: held-out perplexity vs sparsity, one-shot magnitude pruning of the trained
   model (global and per-layer thresholds), plus gradual pruning (Zhu & Gupta schedule, the
   `prune:` section) to 0.8 during a --recover-steps fine-tune of the trained model
   (`init.from_checkpoint`); the curve is written as a PNG.
2. Structured: heads and MLP neurons cut (norm and gradient importance): parameters,
   greedy decode tokens/s (batch 1), held-out perplexity before, after, and after a short
   recovery fine-tune (`init.from_checkpoint` of the pruned checkpoint).

    python benchmarks/prune.py [--run runs/tiny] [--steps 300] [--recover-steps 100]

Without --run the tiny model is trained first with `llm-jax train configs/tiny.yaml`. Every
model is scored on the same held-out batches of that run. Both sides of each comparison
(dense vs pruned) are measured in the same process, their ratio printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compress_common import (
    ROOT,
    decode_speeds,
    heldout,
    heldout_batches,
    run_config,
    table,
    train_cli,
    train_dict,
)

from llm_jax.compress.prune import prune_params, sparsity_of
from llm_jax.compress.structured import (
    gradient_saliency,
    norm_saliency,
    prune_structure,
)
from llm_jax.convert import restore_model, save_checkpoint
from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.models.common import count_params
from llm_jax.parallel.mesh import logical_axes

TINY = ROOT / "configs" / "tiny.yaml"
SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def unstructured(model, batches, gradual_dir: Path | None) -> list[dict]:
    axes, params = logical_axes(model), jax.device_get(params_of(model))
    rows = []
    for scope in ("global", "layer"):
        for s in SPARSITIES:
            pruned = prune_params(params, axes, s, scope)
            m = model_from_params(model.cfg, pruned)
            rows.append({"method": f"one-shot {scope}", "target": s,
                         "sparsity": sparsity_of(pruned, axes), **heldout(m, batches)})  # fmt: skip
    if gradual_dir is not None:
        g = restore_model(gradual_dir).model
        achieved = sparsity_of(params_of(g), axes)
        rows.append({"method": "gradual (fine-tune)", "target": SPARSITIES[-2],
                     "sparsity": achieved, **heldout(g, batches)})  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["sparsity"], r["ppl"]) for r in rows if r["method"] == method]
        style = "o-" if len(pts) > 1 else "*"
        ax.plot(*zip(*pts, strict=True), style, label=method, markersize=10 if style == "*" else 4)
    ax.set_xlabel("sparsity of the weight matrices")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title("tiny GPT: magnitude pruning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(path))


def structured(run: Path, model, batches, args, out: Path) -> list[dict]:
    cfg, params = model.cfg, jax.device_get(params_of(model))
    rows = [{"model": "dense", "params": count_params(model),
             "ppl": heldout(model, batches)["ppl"]}]  # fmt: skip
    models = {"dense": model}
    saliencies = {
        "norm": norm_saliency(params),
        "gradient": gradient_saliency(model, batches[: args.importance_batches], "clm"),
    }
    for name, saliency in saliencies.items():
        small_cfg, small = prune_structure(
            cfg, params, heads=args.heads, ffn=args.ffn, saliency=saliency
        )
        pruned = model_from_params(small_cfg, small)
        ckpt = out / f"pruned_{name}"
        if not ckpt.exists():
            save_checkpoint(pruned, ckpt, tokenizer=run / "tokenizer")
        models[f"{args.heads} heads, d_ff {args.ffn} ({name})"] = pruned
        row = {"model": f"{args.heads} heads, d_ff {args.ffn} ({name})",
               "params": count_params(pruned), "ppl": heldout(pruned, batches)["ppl"]}  # fmt: skip
        if args.recover_steps:
            tuned = out / f"recovered_{name}"
            d = run_config(TINY, run, tuned, model=None, init={"from_checkpoint": str(ckpt)},
                           train={"steps": args.recover_steps, "eval_every": 0,
                                  "checkpoint_every": args.recover_steps},
                           optimizer={"learning_rate": 1e-3, "warmup_steps": 10})  # fmt: skip
            if not (tuned / "checkpoints").exists():
                train_dict(d)
            row["ppl after recovery"] = heldout(restore_model(tuned).model, batches)["ppl"]
        rows.append(row)
    speeds = decode_speeds(models)
    for row in rows:
        row["tok/s"] = speeds[row["model"]]
        row["speed ratio"] = speeds[row["model"]] / speeds["dense"]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="a finished tiny run (else trained)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/llm_jax_prune_bench"))
    p.add_argument("--steps", type=int, default=300, help="training steps of the tiny run")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--importance-batches", type=int, default=4)
    p.add_argument("--recover-steps", type=int, default=100)
    p.add_argument("--no-gradual", action="store_true", help="skip the gradual-pruning run")
    args = p.parse_args()
    out = args.workdir
    out.mkdir(parents=True, exist_ok=True)
    run = args.run or out / "tiny"
    if not (run / "checkpoints").exists():
        train_cli(TINY, run, f"train.steps={args.steps}")
    gradual = None
    if not args.no_gradual:
        gradual = out / "gradual"
        if not (gradual / "checkpoints").exists():
            n = args.recover_steps
            train_dict(run_config(
                TINY, run, gradual, model=None, init={"from_checkpoint": str(run)},
                train={"steps": n, "eval_every": 0, "checkpoint_every": n},
                optimizer={"learning_rate": 1e-3, "warmup_steps": 10},
                prune={"sparsity": SPARSITIES[-2], "start_step": 0, "end_step": n * 4 // 5,
                       "frequency": max(n // 20, 1)},
            ))  # fmt: skip
    batches = heldout_batches(run, args.eval_batches)
    model = restore_model(run).model
    rows = unstructured(model, batches, gradual)
    png = out / "sparsity_vs_perplexity.png"
    plot(rows, png)
    print("## Unstructured magnitude pruning (held-out perplexity)\n")
    print(table(rows, ["method", "target", "sparsity", "loss", "ppl"]))
    print(f"\nfigure: {png}\n")
    srows = structured(run, model, batches, args, out)
    print("## Structured pruning (greedy batch 1, 64 new tokens; speed ratio = pruned/dense)\n")
    print(table(srows, ["model", "params", "tok/s", "speed ratio", "ppl", "ppl after recovery"]))
    (out / "prune.json").write_text(json.dumps({"unstructured": rows, "structured": srows},
                                               indent=1, default=float))  # fmt: skip
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
