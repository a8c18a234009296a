"""`llm-jax convert`: Hugging Face folders <-> our checkpoints.

    llm-jax convert --from-hf HF_DIR --to CHECKPOINT_DIR
    llm-jax convert --from-checkpoint CHECKPOINT_DIR --to-hf OUT_DIR
    llm-jax convert --from-hf HF_DIR --to-hf OUT_DIR          (re-export, e.g. to check)

The tokenizer travels along when the source has one (HF tokenizer files, or the
checkpoint's `tokenizer/` folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _convert(args: argparse.Namespace) -> int:
    from llm_jax.convert.checkpoint import restore_model, save_checkpoint
    from llm_jax.convert.hf import hf_spec, load_hf, save_hf
    from llm_jax.convert.tokenizer import load_hf_tokenizer
    from llm_jax.models import count_params

    if (args.from_hf is None) == (args.from_checkpoint is None):
        raise ValueError("give exactly one source: --from-hf DIR or --from-checkpoint DIR.")
    if (args.to is None) == (args.to_hf is None):
        raise ValueError("give exactly one destination: --to CHECKPOINT_DIR or --to-hf OUT_DIR.")
    spec = None
    if args.from_hf is not None:
        src = Path(args.from_hf)
        model = load_hf(src)
        spec = hf_spec(src)
        try:
            tokenizer = load_hf_tokenizer(src)
        except FileNotFoundError:
            tokenizer = None
        source = f"Hugging Face {spec.architecture} from {src}"
    else:
        loaded = restore_model(args.from_checkpoint)
        model = loaded.model
        tok_dir = loaded.ref.tokenizer_dir()
        tokenizer = None if tok_dir is None else load_hf_tokenizer(tok_dir)
        source = f"checkpoint step {loaded.ref.step} from {loaded.ref.dir}"
    cfg = model.cfg
    if args.to is not None:
        out = save_checkpoint(model, args.to, tokenizer=tokenizer)
    else:
        out = save_hf(model, args.to_hf, tokenizer=tokenizer, spec=spec)
    print(
        json.dumps(
            {
                "source": source,
                "family": cfg.family,
                "parameters": count_params(model),
                "tokenizer": None if tokenizer is None else type(tokenizer).__name__,
                "written": str(out),
            },
            indent=1,
        )
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `llm-jax convert`."""
    parser = subparsers.add_parser(
        "convert",
        help="import/export Hugging Face GPT-2, LLaMA, BERT and T5 checkpoints",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = parser.add_argument_group("source (one of)")
    src.add_argument("--from-hf", metavar="DIR", help="Hugging Face model folder")
    src.add_argument(
        "--from-checkpoint",
        metavar="DIR",
        help="our checkpoint: a converted model, a training run's workdir or a step folder",
    )
    dst = parser.add_argument_group("destination (one of)")
    dst.add_argument("--to", metavar="CHECKPOINT_DIR", help="write our checkpoint (step 0)")
    dst.add_argument("--to-hf", metavar="OUT_DIR", help="write a Hugging Face folder")
    parser.set_defaults(func=_convert)
    return parser
