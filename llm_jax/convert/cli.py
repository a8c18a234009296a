"""`llm-jax convert`: Hugging Face folders <-> our checkpoints.

    llm-jax convert --from-hf HF_DIR --to CHECKPOINT_DIR
    llm-jax convert --from-checkpoint CHECKPOINT_DIR --to-hf OUT_DIR
    llm-jax convert --from-hf HF_DIR --to-hf OUT_DIR          (re-export, e.g. to check)
    llm-jax convert --from-checkpoint RUN --to-hf OUT_DIR --adapters-only   (a LoRA run's
        adapters as a PEFT folder; without the flag a LoRA model is written merged)
    llm-jax convert --from-hf HF_DIR --to CHECKPOINT_DIR --quantize int8   (or int4
        [--group-size 128]: weight-only quantized; `sample --checkpoint` loads it as is)
    llm-jax convert --from-checkpoint RUN --to OUT --quantize int4 --gptq TEXT.txt
        [--embed-bits 8]   (GPTQ, calibrated on 128 windows of the text's first 90%)

The tokenizer travels along when the source has one (HF tokenizer files, or the
checkpoint's `tokenizer/` folder).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

# The optional modules `convert` needs (the `convert` extra), by import name.
_EXTRA_MODULES = ("safetensors", "tokenizers")


def _check_extra() -> None:
    missing = [m for m in _EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(
            f"llm-jax convert needs {' and '.join(missing)}: install them with "
            '`pip install -e ".[convert]"` (or `pip install safetensors tokenizers`).'
        )


def _check_destination(args: argparse.Namespace) -> None:
    if args.to_hf is None:
        return  # our checkpoints refuse an existing step themselves
    out = Path(args.to_hf)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder: choose another destination.")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(
            f"{out} exists and is not empty: choose a new folder, or pass --overwrite to "
            "replace the files of the same names."
        )


QUANT_BITS = {"int8": 8, "int4": 4}


def _check_quantize(args: argparse.Namespace) -> int | None:
    """The group size for --quantize (None: the default of its bit width)."""
    if args.quantize is None:
        given = [f for f, v in (("--group-size", args.group_size), ("--gptq", args.gptq)) if v]
        if given or args.embed_bits:
            raise ValueError(
                f"{given[0] if given else '--embed-bits'} applies only with --quantize int8|int4."
            )
        return None
    if args.to is None:
        raise ValueError(
            "--quantize writes our checkpoint format (int8 kernels + scales): use it with "
            "--to CHECKPOINT_DIR, not --to-hf."
        )
    if args.group_size is not None and args.group_size < 0:
        raise ValueError(f"--group-size {args.group_size} must be >= 0 (0: per channel).")
    if args.gptq is not None and not Path(args.gptq).is_file():
        raise ValueError(f"--gptq {args.gptq}: no such text file (the calibration text).")
    return args.group_size


def _quantize(args: argparse.Namespace, model, tokenizer, group_size: int | None):
    """--quantize: round to nearest, or GPTQ calibrated on --gptq's text."""
    from llm_jax.compress import gptq, quantize, text_windows

    bits, embed_bits = QUANT_BITS[args.quantize], args.embed_bits
    if args.gptq is None:
        return quantize(model, bits=bits, group_size=group_size, embed_bits=embed_bits)
    if tokenizer is None:
        raise ValueError(
            "--gptq tokenizes its text with the source's tokenizer; this one has none."
        )
    cfg = model.cfg
    limit = cfg.max_position_embeddings if cfg.position == "learned" else 256
    calibration = text_windows(tokenizer, args.gptq, args.calib_windows, min(256, limit))
    return gptq(model, calibration, bits, group_size, embed_bits)


def _convert(args: argparse.Namespace) -> int:
    if (args.from_hf is None) == (args.from_checkpoint is None):
        raise ValueError("give exactly one source: --from-hf DIR or --from-checkpoint DIR.")
    if (args.to is None) == (args.to_hf is None):
        raise ValueError("give exactly one destination: --to CHECKPOINT_DIR or --to-hf OUT_DIR.")
    if args.adapters_only and (args.from_checkpoint is None or args.to_hf is None):
        raise ValueError(
            "--adapters-only writes a LoRA run's adapters as a PEFT folder: use it with "
            "--from-checkpoint RUN --to-hf OUT_DIR."
        )
    group_size = _check_quantize(args)
    _check_extra()
    _check_destination(args)
    # Imported after the checks: they pull in JAX and the optional extra.
    from llm_jax.convert.checkpoint import restore_model, save_checkpoint
    from llm_jax.convert.hf import hf_spec, load_hf, save_hf
    from llm_jax.convert.tokenizer import load_hf_tokenizer
    from llm_jax.models import count_params

    spec, add_bos = None, None
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
        data = loaded.config.get("data") or {}
        if data.get("objective") == "clm":  # BOS framing as in training, for AutoTokenizer
            add_bos = bool(data.get("add_bos", True))
    cfg = model.cfg
    if args.adapters_only:
        from llm_jax.convert.hf import params_of
        from llm_jax.finetune.peft import save_peft_adapter

        if not cfg.lora_rank:
            raise ValueError(
                f"the checkpoint's model has no LoRA adapters (lora_rank=0): drop "
                f"--adapters-only to export the whole model ({source})."
            )
        out = save_peft_adapter(cfg, params_of(model), args.to_hf)
    elif args.to is not None:
        if args.quantize is not None:
            model = _quantize(args, model, tokenizer, group_size)
        out = save_checkpoint(model, args.to, tokenizer=tokenizer)
    else:
        out = save_hf(model, args.to_hf, tokenizer=tokenizer, spec=spec, add_bos=add_bos)
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
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="--to-hf into a folder that already has files (files of the same names replaced)",
    )
    parser.add_argument(
        "--adapters-only",
        action="store_true",
        help="with --from-checkpoint of a LoRA run and --to-hf: write only the adapters, as "
        "a PEFT folder (adapter_config.json + adapter_model.safetensors)",
    )
    parser.add_argument(
        "--quantize",
        choices=sorted(QUANT_BITS),
        help="with --to: store the dense kernels and token embedding weight-only quantized "
        "(int8: one scale per output channel; int4: packed, grouped scales)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        metavar="G",
        help="inputs per scale with --quantize (default: per channel for int8, 128 for int4)",
    )
    parser.add_argument(
        "--embed-bits",
        type=int,
        choices=(0, 8),
        default=0,
        help="with --quantize int4: 8 keeps the token embedding int8 (0: as --quantize)",
    )
    parser.add_argument(
        "--gptq",
        metavar="TEXT",
        help="with --quantize: GPTQ instead of round-to-nearest, calibrated on windows of this "
        "UTF-8 text (GPT models)",
    )
    parser.add_argument(
        "--calib-windows", type=int, default=128, help="--gptq calibration windows (256 tokens)"
    )
    parser.set_defaults(func=_convert)
    return parser
