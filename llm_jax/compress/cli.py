"""`llm-jax prune`: a smaller checkpoint from a trained one.

    llm-jax prune --checkpoint runs/tiny --heads 2 --ffn 256 --out runs/tiny_pruned
    llm-jax prune --checkpoint runs/tiny --heads 3 --ffn 384 --importance gradient \
        --batches 4 --out runs/tiny_pruned
    llm-jax prune --checkpoint runs/tiny --sparsity 0.5 --out runs/tiny_sparse

`--heads` / `--ffn` keep that many attention heads and feed-forward neurons per layer
(structured: the model shrinks; `llm_jax.compress.structured`); `--sparsity` zeroes that
fraction of the weight matrices by magnitude (unstructured: same shapes, one-shot;
`llm_jax.compress.prune`). The output is an ordinary checkpoint with the run's tokenizer:
`llm-jax sample --checkpoint OUT`, `restore_model(OUT)` and `init.from_checkpoint: OUT`
(a recovery fine-tune) read it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _batches(config: dict, run_dir: Path, objective: str, n: int) -> list[dict]:
    """`n` held-out (else training) batches of the run's own data, as host arrays."""
    import jax

    from llm_jax.data.config import DataConfig
    from llm_jax.parallel.mesh import MeshConfig, make_mesh
    from llm_jax.train import data as train_data

    if "data" not in config:
        raise ValueError(
            "--importance gradient reads the run's data, but this checkpoint's config has "
            "no data section (a converted model); use --importance norm."
        )
    data = train_data.prepare(DataConfig.from_dict(config["data"]), run_dir)
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    batches = data.eval_batches(mesh, n)
    if not batches:
        it = data.train_iterator(mesh)
        batches = [next(it) for _ in range(n)]
    return [jax.device_get(b) for b in batches]


def _run(args: argparse.Namespace) -> int:
    import jax

    from llm_jax.compress.prune import prune_params
    from llm_jax.compress.structured import (
        check_prunable,
        gradient_saliency,
        norm_saliency,
        prune_structure,
    )
    from llm_jax.convert import restore_model, save_checkpoint
    from llm_jax.convert.hf import model_from_params, params_of
    from llm_jax.models.common import count_params
    from llm_jax.parallel.mesh import logical_axes

    structured = args.heads is not None or args.ffn is not None
    if structured == (args.sparsity is not None):
        raise ValueError("give --heads/--ffn (structured) or --sparsity (unstructured), not both.")
    restored = restore_model(args.checkpoint, args.step)
    model, cfg = restored.model, restored.model.cfg
    params = jax.tree.map(jax.device_get, params_of(model))
    if structured:
        heads = cfg.num_heads if args.heads is None else args.heads
        ffn = cfg.d_ff if args.ffn is None else args.ffn
        check_prunable(cfg, heads, ffn)  # before any data is read
        if args.importance == "gradient":
            run_dir = restored.ref.dir.parent.parent
            objective = (restored.config.get("data") or {}).get("objective", "clm")
            batches = _batches(restored.config, run_dir, objective, args.batches)
            saliency = gradient_saliency(model, batches, objective)
        else:
            saliency = norm_saliency(params)
        cfg, params = prune_structure(cfg, params, heads=heads, ffn=ffn, saliency=saliency)
    else:
        params = prune_params(params, logical_axes(model), args.sparsity, args.scope)
    pruned = model_from_params(cfg, params)
    step_dir = save_checkpoint(pruned, args.out, tokenizer=restored.tokenizer_dir)
    print(
        f"{args.checkpoint}: {count_params(model):,} parameters -> {count_params(pruned):,} "
        f"(heads {cfg.num_heads}, d_ff {cfg.d_ff}); wrote {step_dir}",
        file=sys.stderr,
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a checkpoint: fewer heads / MLP neurons, or magnitude sparsity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run, checkpoint or step folder")
    p.add_argument("--step", type=int, default=None, help="the step (default: newest)")
    p.add_argument("--out", required=True, help="the new checkpoint folder")
    p.add_argument("--heads", type=int, default=None, help="attention heads kept per layer")
    p.add_argument("--ffn", type=int, default=None, help="feed-forward neurons kept per layer")
    p.add_argument(
        "--importance",
        choices=("norm", "gradient"),
        default="norm",
        help="head/neuron importance: weight norm, or |w*grad| over --batches batches",
    )
    p.add_argument("--batches", type=int, default=4, help="batches for --importance gradient")
    p.add_argument("--sparsity", type=float, default=None, help="unstructured: zero this share")
    p.add_argument("--scope", choices=("global", "layer"), default="global")
    p.set_defaults(func=_run)
