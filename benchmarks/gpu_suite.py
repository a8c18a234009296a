"""The GPU figures of issue 15, one part per subcommand (run all of them with gpu_suite.sh).

    python benchmarks/gpu_suite.py mfu --preset gpt2-small --seq 1024 --batch 16
    python benchmarks/gpu_suite.py mfu --preset llama-1b --seq 2048 --batch 8
    python benchmarks/gpu_suite.py decode --preset llama-1b
    python benchmarks/gpu_suite.py attention --seq 2048
    python benchmarks/gpu_suite.py ... --tiny     # tiny shapes: a CPU smoke of the code paths

`mfu` trains the preset in bfloat16 (scanned layers, one device, AdamW) for each attention
implementation x remat policy of the grid, and prints compile seconds, s/step, tokens/s and
MFU (model FLOPs 6N + attention per token, `llm_jax.train.flops`, over the device's dense
bf16 peak) per cell and the best cell. Targets: gpt2-small T=1024 >= 45%, llama-1b T=2048
>= 55%, compile <= 30 s.

`decode` runs greedy batch-1 generation of the preset with bfloat16 weights and prints
tokens/s against the HBM-bandwidth floor: each new token reads every weight (and the KV
cache) once, so tokens/s <= bandwidth / bytes read per token. The bandwidth is measured in
the same run (a large on-device copy) and the datasheet value is printed beside it. Per
token time excludes prefill: (t(2n) - t(n)) / n. Target >= 60% of the floor.

`attention` times forward + backward of causal bfloat16 attention with grouped-query heads
for xla and the fused implementation (`cudnn` on GPU; whatever `auto` picks elsewhere) in one
run, prints both and their ratio, and the largest difference of their outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Datasheet HBM bandwidth (bytes/s) by device kind substring; None elsewhere.
HBM_BANDWIDTH = {"h200": 4.8e12, "h100": 3.35e12, "a100": 2.0e12, "l4": 0.3e12}
TINY = {"gpt2-small": "gpt2-tiny", "llama-1b": "llama-tiny", "gpt2-medium": "gpt2-tiny"}


def _model_config(args, **overrides):
    from llm_jax.models.config import ModelConfig

    preset = TINY.get(args.preset, args.preset) if args.tiny else args.preset
    fields = dict(dtype="bfloat16", scan_layers=True, dropout_rate=0.0, attention_dropout_rate=0.0)
    if args.tiny:
        fields["max_position_embeddings"] = max(256, args.seq)
    return ModelConfig.preset(preset, **{**fields, **overrides})


def _clm_batch(b: int, t: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(b, t + 1), dtype=np.int32)
    return {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((b, t), np.float32),
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }


def train_cell(args, impl: str, remat: str) -> dict:
    """Compile and time the train step of one grid cell on one device."""
    from llm_jax.parallel import MeshConfig, make_mesh
    from llm_jax.train.compile import compile_steps, state_layout
    from llm_jax.train.flops import mfu, model_flops_per_token, peak_flops_per_device
    from llm_jax.train.optimizer import OptimizerConfig

    cfg = _model_config(args, attention_impl=impl, remat_policy=remat)
    opt = OptimizerConfig(learning_rate=1e-4, warmup_steps=0, schedule="constant")
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    layout = state_layout(cfg, opt, mesh, total_steps=100)
    state = layout.init()
    host = _clm_batch(args.batch, args.seq, cfg.vocab_size)
    t0 = time.perf_counter()
    steps = compile_steps(layout, "clm", host)
    compile_s = time.perf_counter() - t0
    batch = layout.put_batch(host)
    state, m = steps.train(state, batch)
    float(m["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = steps.train(state, batch)
        float(m["loss"])
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_s = args.batch * args.seq / step_s
    flops = model_flops_per_token(cfg, args.seq)
    return {
        "impl": impl,
        "remat": remat,
        "compile_s": compile_s,
        "step_s": step_s,
        "tokens_s": tokens_s,
        "mfu": mfu(tokens_s, flops, 1, peak_flops_per_device(dtype="bfloat16")),
        "temp_gib": getattr(steps.memory, "temp_size_in_bytes", 0) / 2**30,
    }


def run_mfu(args) -> int:
    from llm_jax.train.flops import format_mfu

    print(f"# mfu {args.preset} T={args.seq} B={args.batch} bf16 on {jax.devices()[0].device_kind}")
    print("impl     remat           compile_s   s/step    tokens/s      MFU   temp GiB")
    rows = []
    for impl in args.impls.split(","):
        for remat in args.remats.split(","):
            try:
                r = train_cell(args, impl, remat)
            except Exception as e:  # an out-of-memory cell is a result, not an abort
                print(f"{impl:<8} {remat:<15} failed: {type(e).__name__}: {str(e)[:160]}")
                continue
            rows.append(r)
            print(
                f"{impl:<8} {remat:<15} {r['compile_s']:9.1f} {r['step_s']:9.4f} "
                f"{r['tokens_s']:11.0f} {format_mfu(r['mfu']):>8} {r['temp_gib']:10.2f}"
            )
    if not rows:
        return 1
    best = max(rows, key=lambda r: r["tokens_s"])
    print(
        f"best: attention_impl={best['impl']} remat_policy={best['remat']}: "
        f"MFU {format_mfu(best['mfu'])}, compile {best['compile_s']:.1f} s "
        f"(targets: MFU {args.target_mfu:.0%}, compile <= 30 s)"
    )
    return 0


def measured_bandwidth(gib: float = 2.0, repeats: int = 10) -> float:
    """Bytes/s of a large on-device copy-with-add (reads and writes every byte once)."""
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    f(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * x.nbytes / min(times)


def run_decode(args) -> int:
    from flax import nnx

    import llm_jax.sample as sample
    from llm_jax.models import build

    cfg = _model_config(args, param_dtype="bfloat16", attention_impl=args.impl)
    model = build(cfg, rngs=nnx.Rngs(0))
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, args.prompt))
    n = args.new_tokens
    kv_bytes = 2 * cfg.num_layers * (args.prompt + 2 * n) * cfg.num_kv_heads * cfg.head_dim * 2

    def timed(new_tokens: int) -> float:
        def call():
            out = sample.generate(
                model, prompt, max_new_tokens=new_tokens, strategy=sample.Greedy()
            )
            return jax.device_get(out.tokens)

        call()  # compile
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
        return best

    per_token = (timed(2 * n) - timed(n)) / n
    if per_token <= 0:
        print(f"timing noise exceeded {n} tokens' time; rerun with more --new-tokens")
        return 1
    kind = jax.devices()[0].device_kind
    sheet = next((v for k, v in HBM_BANDWIDTH.items() if k in kind.lower()), None)
    bandwidth = measured_bandwidth(0.25 if args.tiny else 2.0)
    read = weights + kv_bytes / 2  # the cache is on average half full over the run
    print(f"# decode {cfg.num_layers}-layer {args.preset} bf16, batch 1, greedy, on {kind}")
    print(f"weights {weights / 2**30:.3f} GiB, per-token read ~{read / 2**30:.3f} GiB")
    print(f"tokens/s measured:                {1 / per_token:10.1f}")
    floor = bandwidth / read
    print(f"tokens/s floor (measured copy BW): {floor:10.1f}  ({bandwidth / 1e9:.0f} GB/s)")
    if sheet:
        print(f"tokens/s floor (datasheet BW):     {sheet / read:10.1f}  ({sheet / 1e9:.0f} GB/s)")
    print(f"fraction of the measured floor: {(1 / per_token) / floor:.1%} (target >= 60%)")
    return 0


def run_attention(args) -> int:
    from llm_jax.models import attention_impl as attn

    b, t, n, k, h = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.bfloat16)
    kv = [jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.bfloat16) for _ in range(2)]
    mask = attn.AttentionMask.of(t, causal=True, segment_ids=jnp.ones((b, t), jnp.int32))
    fused = attn.resolve(args.fused)
    results = {}
    for impl in ("xla", fused):

        def loss(q, k, v, impl=impl):
            out = attn.attention(q, k, v, mask, impl=impl)
            return jnp.sum(out.astype(jnp.float32)), out

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
        (_, out), grads = f(q, *kv)
        jax.block_until_ready(grads)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, *kv))
            times.append(time.perf_counter() - t0)
        results[impl] = (min(times), out)
    (tx, ox), (tf, of) = results["xla"], results[fused]
    diff = float(jnp.max(jnp.abs(ox.astype(jnp.float32) - of.astype(jnp.float32))))
    print(f"# attention fwd+bwd causal bf16 B={b} T={t} N={n} K={k} H={h}")
    print(f"xla: {tx * 1e3:.3f} ms   {fused}: {tf * 1e3:.3f} ms   xla/{fused}: {tx / tf:.2f}x")
    print(f"max |xla - {fused}| = {diff:.3e}")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=("mfu", "decode", "attention"))
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--impls", default="auto,xla", help="attention impls of the mfu grid")
    p.add_argument("--remats", default="none,dots_no_batch,full", help="remat policies")
    p.add_argument("--target-mfu", type=float, default=0.45)
    p.add_argument("--impl", default="auto", help="decode: attention impl")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--fused", default="auto", help="attention: the impl compared with xla")
    p.add_argument("--tiny", action="store_true", help="tiny presets and shapes (CPU smoke)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return {"mfu": run_mfu, "decode": run_decode, "attention": run_attention}[args.part](args)


if __name__ == "__main__":
    sys.exit(main())
