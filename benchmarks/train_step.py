"""Train-step throughput: llm_jax vs Hugging Face PyTorch, same CPU, same shapes, one run.

    pip install -e ".[hf]"   # torch==2.13.0 (CPU wheel), transformers
    python benchmarks/train_step.py [--batch 4 --seq 256 --steps 5 --preset gpt2-small]

Both sides train GPT-2 small in fp32 with AdamW (dropout off on both sides, so the work is
identical): llm_jax's jitted, donated `train_step` and `GPT2LMHeadModel` + `torch.optim.AdamW`.
It prints tokens/s of each side and their ratio, and llm_jax's achieved FLOP/s (model FLOPs
6N + attention per token, see llm_jax/train/flops.py) over the FLOP/s of a large `jnp.dot`
measured in the same run. Targets: ratio >= 1.3; FLOP/s fraction >= 0.5.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.models import ModelConfig
from llm_jax.parallel import MeshConfig, make_mesh
from llm_jax.train.flops import model_flops_per_token
from llm_jax.train.optimizer import OptimizerConfig
from llm_jax.train.trainer import Trainer


def time_steps(step, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def bench_llm_jax(cfg: ModelConfig, batch: dict, steps: int) -> tuple[list[float], float]:
    opt = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant",
                          weight_decay=0.01, b2=0.999)
    trainer = Trainer(cfg, opt, make_mesh(MeshConfig(), jax.devices()[:1]), total_steps=100,
                      objective="clm")
    state = trainer.init_state()
    t0 = time.perf_counter()
    trainer.compile_step(batch)
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def step():
        holder["state"], metrics = trainer.step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    step()  # first run (allocation)
    return time_steps(step, steps), compile_s


def bench_torch(cfg: ModelConfig, tokens: np.ndarray, steps: int) -> list[float]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.d_model,
        n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(hf_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    inputs = torch.from_numpy(tokens).long()

    def step():
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return time_steps(step, steps)


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = min(time_steps(lambda: dot(a, b).block_until_ready(), reps))
    return 2 * n**3 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--skip-torch", action="store_true")
    args = p.parse_args()

    cfg = ModelConfig.preset(args.preset, dropout_rate=0.0, attention_dropout_rate=0.0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((args.batch, args.seq), np.float32),
    }
    n_tok = args.batch * args.seq
    print(f"{args.preset} fp32, batch {args.batch}x{args.seq}, AdamW; {os.cpu_count()} CPU "
          f"cores; jax {jax.__version__} on {jax.devices()[0].device_kind}")

    ours, compile_s = bench_llm_jax(cfg, batch, args.steps)
    ours_tps = n_tok / statistics.median(ours)
    rows = [("llm_jax (jit, donated)", ours, ours_tps)]
    if not args.skip_torch:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        theirs = bench_torch(cfg, tokens[:, :-1], args.steps)
        rows.append((f"HF GPT2LMHeadModel (torch {torch.__version__})", theirs,
                     n_tok / statistics.median(theirs)))
    print(f"\nllm_jax compile: {compile_s:.1f} s")
    print(f"{'side':<44} {'median s/step':>14} {'min':>8} {'max':>8} {'tokens/s':>10}")
    for name, times, tps in rows:
        print(f"{name:<44} {statistics.median(times):>14.3f} {min(times):>8.3f} "
              f"{max(times):>8.3f} {tps:>10,.0f}")
    if len(rows) == 2:
        print(f"ratio llm_jax / HF: {rows[0][2] / rows[1][2]:.2f}x  (target >= 1.3x)")

    flops_tok = model_flops_per_token(cfg, args.seq)
    achieved = flops_tok * ours_tps
    peak = matmul_flops()
    print(f"\nmodel FLOPs per token (6N + attention): {flops_tok / 1e9:.3f} GFLOP")
    print(f"llm_jax achieved: {achieved / 1e9:.1f} GFLOP/s; large jnp.dot (2048^2 fp32): "
          f"{peak / 1e9:.1f} GFLOP/s; fraction {achieved / peak:.2f}  (target >= 0.5)")


if __name__ == "__main__":
    main()
