"""Evaluation throughput: llm_jax's log-likelihood scorer vs Hugging Face's forward, same
weights, same windows, same CPU, one run.

    pip install -e ".[hf]"   # torch==2.13.0 (CPU wheel), transformers
    python benchmarks/eval.py [--model small|mini] [--length 256] [--batch 4] [--batches 4]

Both sides score the same sliding windows of a real text (Shakespeare from ../shared/data,
else the excerpt under tests/data; ids from a byte-level map, since the random model has
no tokenizer of its own) with GPT-2-shaped fp32 models holding identical random weights
(`GPT2LMHeadModel` built with a fixed seed, loaded into our `GPT` through safetensors):

- llm_jax: `lj.eval.loglikelihood` (the scorer of `llm-jax eval`: packed rows, one jitted
  forward + log-probability of the targets per batch);
- Hugging Face: `model(input_ids, attention_mask).logits`, `log_softmax`, gather of the
  targets, under `torch.inference_mode()` with `torch.set_num_threads(<usable cores>)`.

After a cold call each, the sides alternate for --repeats rounds; the table shows the best
round's scored tokens/s, the spread (median / best - 1) and the ratio. The summed
log-likelihoods of both sides are checked equal (rtol 1e-4) so both did the same work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = Path(__file__).resolve().parents[1]
TEXTS = (
    ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
    ROOT / "tests/data/shakespeare.txt",
)
MODELS = {
    "small": dict(n_embd=768, n_layer=12, n_head=12),  # GPT-2 small, 124M
    "mini": dict(n_embd=384, n_layer=6, n_head=6),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--length", type=int, default=256, help="positions per window")
    p.add_argument("--batch", type=int, default=4, help="windows per forward")
    p.add_argument("--batches", type=int, default=4, help="forwards per timed round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def build_models(name: str, length: int, seed: int):
    """(HF model, our GPT) with identical fp32 weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import llm_jax as lj

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50257, n_positions=max(1024, length), **MODELS[name])
    hf = GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        ours = lj.convert.load_hf(tmp)
    return hf, ours


def windows(length: int, count: int):
    """`count` non-overlapping windows of a real text as (context, continuation) requests:
    one token of context, `length` scored tokens each."""
    from llm_jax.eval import Request

    text = next(p for p in TEXTS if p.exists()).read_bytes()
    ids = [b + 256 * (i % 7) for i, b in enumerate(text)]  # spread over more of the vocab
    need = count * (length + 1)
    if len(ids) < need:
        raise ValueError(f"the text has {len(ids)} bytes; {need} are needed.")
    return [
        Request.of(
            ids[k * (length + 1) : k * (length + 1) + 1],
            ids[k * (length + 1) + 1 : (k + 1) * (length + 1)],
        )
        for k in range(count)
    ]


def hf_scorer(model, requests, batch: int):
    import torch

    def run() -> float:
        total = 0.0
        with torch.inference_mode():
            for lo in range(0, len(requests), batch):
                rows = requests[lo : lo + batch]
                seq = torch.tensor([list(r.context + r.continuation) for r in rows])
                logits = model(seq[:, :-1], attention_mask=torch.ones_like(seq[:, :-1])).logits
                logp = torch.log_softmax(logits.float(), dim=-1)
                picked = logp.gather(-1, seq[:, 1:, None])[..., 0]
                total += float(picked[:, len(rows[0].context) - 1 :].sum())
        return total

    return run


def our_scorer(model, requests, batch: int):
    from llm_jax.eval import loglikelihood

    def run() -> float:
        scores = loglikelihood(
            model, requests, batch_size=batch, max_length=len(requests[0].continuation)
        )
        return sum(s.loglikelihood for s in scores)

    return run


def timed(call) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def main() -> int:
    args = parse_args()
    import torch

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    hf, ours = build_models(args.model, args.length, args.seed)
    requests = windows(args.length, args.batch * args.batches)
    sides = {
        "llm_jax": our_scorer(ours, requests, args.batch),
        "hf": hf_scorer(hf, requests, args.batch),
    }
    cold, totals, times = {}, {}, {k: [] for k in sides}
    for name, run in sides.items():
        cold[name], totals[name] = timed(run)
    for _ in range(args.repeats):
        for name, run in sides.items():
            dt, _ = timed(run)
            times[name].append(dt)
    rel = abs(totals["llm_jax"] - totals["hf"]) / abs(totals["hf"])
    if rel > 1e-4:
        print(f"log-likelihoods differ: {totals}", file=sys.stderr)
        return 1
    tokens = len(requests) * args.length
    print(
        f"GPT-2 {args.model} fp32, {len(requests)} windows x {args.length} scored tokens, batch "
        f"{args.batch}, {cores} cores, torch threads {torch.get_num_threads()}; "
        f"sum log-likelihood equal to {rel:.1e} relative"
    )
    print("| side | tokens/s (best) | spread | first call (s) |")
    print("|---|---|---|---|")
    rate = {}
    for name in sides:
        best = min(times[name])
        rate[name] = tokens / best
        spread = statistics.median(times[name]) / best - 1
        print(f"| {name} | {rate[name]:,.0f} | {spread:.1%} | {cold[name]:.2f} |")
    print(f"ratio llm_jax / hf: {rate['llm_jax'] / rate['hf']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
