"""Quality of weight-only quantization: held-out perplexity and greedy continuations of one
trained model in fp32, int8 (per channel) and int4 (grouped), measured in the same run.

    python benchmarks/quantize_quality.py CHECKPOINT [--text FILE ...] [--group-size 128 ...]
        [--method rtn gptq] [--calib-text FILE] [--calib-windows 128] [--embed-bits 0 8]

CHECKPOINT is any of our checkpoints (a training run's workdir, e.g. `llm-jax train
configs/tiny.yaml`, or a converted HF model). Perplexity is exp(mean next-token CE) over
non-overlapping windows of the model's context (at most 256 tokens, at most --max-tokens
per text); the targets are int8 within 1% and int4 within 5% of fp32. int4 runs once per
--group-size, each also with the token embedding kept int8 (`embed_bits=8`, "+e8"): on
models whose tied embedding is a large share of the weights, int4 there costs the most.

`--method gptq` adds the same int4 rows quantized by GPTQ (`lj.compress.gptq`), calibrated
on --calib-windows windows drawn (seeded) from the first 90% of --calib-text (default
tinyshakespeare); when that text is also evaluated, its perplexity is measured on its last
10% only, so calibration and evaluation tokens never overlap.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import llm_jax as lj

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPTS = ("ROMEO:\nWhat light", "In the beginning", "The king said")


def perplexity(model, ids: np.ndarray, window: int) -> float:
    """exp(mean CE) of next-token prediction over [n, window] rows of `ids`."""

    @nnx.jit
    def token_log_probs(m, row):  # [1, W] -> [W - 1]
        logp = jax.nn.log_softmax(m(row[:, :-1]).astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp[0], row[0, 1:, None], axis=-1)[:, 0]

    rows = ids.reshape(-1, window)
    total = sum(
        -np.asarray(token_log_probs(model, jnp.asarray(r[None])), np.float64).sum() for r in rows
    )
    return math.exp(total / (rows.shape[0] * (window - 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--text", nargs="*", default=None, help="held-out text files")
    parser.add_argument("--group-size", type=int, nargs="+", default=[128])
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--method", nargs="+", default=["rtn"], choices=["rtn", "gptq"])
    parser.add_argument("--embed-bits", type=int, nargs="+", default=[0, 8], choices=[0, 8])
    parser.add_argument("--calib-text", default=str(SHARED / "tinyshakespeare.txt"))
    parser.add_argument("--calib-windows", type=int, default=128)
    args = parser.parse_args(argv)
    restored = lj.convert.restore_model(args.checkpoint)
    tok = lj.convert.load_hf_tokenizer(restored.tokenizer_dir)
    fp32 = restored.model
    cfg = fp32.cfg
    window = min(256, cfg.max_position_embeddings or 256)
    calib = lj.compress.text_windows(tok, args.calib_text, args.calib_windows, window)
    models = {"fp32": fp32, "int8": lj.compress.quantize(fp32, bits=8)}
    for size in args.group_size:
        # The largest group <= size dividing every kernel's input (D, F and N * H).
        group = math.gcd(size, cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.head_dim)
        for method in args.method:
            for embed_bits in args.embed_bits:
                name = f"int4-g{group}{'+e8' if embed_bits else ''}{'-gptq' * (method == 'gptq')}"
                kw = dict(bits=4, group_size=group, embed_bits=embed_bits)
                start = time.perf_counter()
                if method == "gptq":
                    models[name] = lj.compress.gptq(fp32, calib, **kw)
                else:
                    models[name] = lj.compress.quantize(fp32, **kw)
                seconds = time.perf_counter() - start
                print(f"{name}: quantized in {seconds:.1f} s", file=sys.stderr, flush=True)
    texts = args.text or [str(SHARED / "bible-kjv.txt"), str(SHARED / "tinyshakespeare.txt")]
    print(f"model: {args.checkpoint} ({lj.models.count_params(fp32):,} parameters)")
    if "gptq" in args.method:
        print(
            f"GPTQ calibration: {calib.shape[0]} windows of {window} tokens from the first "
            f"90% of {Path(args.calib_text).name}"
        )
    header = f"{'text':<24} {'model':<18} {'MB':>7} {'perplexity':>11} {'change':>8}"
    print(header + "\n" + "-" * len(header))
    for path in texts:
        text = Path(path).read_text(errors="replace")
        if "gptq" in args.method and Path(path).resolve() == Path(args.calib_text).resolve():
            text = text[int(0.9 * len(text)) :]  # the 10% calibration never saw
        # The text's last characters: held out from any run that trained on its start.
        ids = np.asarray(tok.encode(text[-200_000:])[: args.max_tokens], np.int32)
        ids = ids[: len(ids) // window * window]
        base = None
        for name, model in models.items():
            ppl = perplexity(model, ids, window)
            base = ppl if base is None else base
            mb = lj.compress.weight_bytes(model) / 1e6
            change = f"{100 * (ppl / base - 1):+.2f}%"
            print(f"{Path(path).name:<24} {name:<18} {mb:7.2f} {ppl:11.3f} {change:>8}")
    print("\ngreedy continuations:")
    for prompt in PROMPTS if args.new_tokens else ():
        ids = tok.encode(prompt)
        for name, model in models.items():
            out = lj.sample.generate(model, [ids], max_new_tokens=args.new_tokens)
            text = tok.decode(np.asarray(out.tokens)[0].tolist())
            print(f"  {name:<18} {prompt!r} -> {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
