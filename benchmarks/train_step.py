"""Train-step throughput: llm_jax vs Hugging Face PyTorch, same CPU, same shapes, one run.

    pip install -e ".[hf]"   # torch==2.13.0 (CPU wheel), transformers
    python benchmarks/train_step.py [--batch 4 --seq 256 --steps 8 --preset gpt2-small]

Both sides train GPT-2 small in fp32 with AdamW (dropout off on both sides, so the work is
identical): llm_jax's jitted, donated `train_step` and `GPT2LMHeadModel` + `torch.optim.AdamW`.
After a warm-up step each, the two sides' steps alternate (ours, theirs, ours, ...), so load
from other processes on a shared machine falls on both alike. It prints the median and best
s/step and tokens/s of each side and their ratio, and llm_jax's achieved FLOP/s (model FLOPs
6N + attention per token, see llm_jax/train/flops.py) over the FLOP/s of a large `jnp.dot`
measured in the same run. Targets: ratio >= 1.3; FLOP/s fraction >= 0.5.

Process settings (printed; both sides run under them):

* `--xla-preset onednn` (default) appends XLA:CPU flags that send every dot to oneDNN. The
  default YNNPACK dot path only takes dots whose operands are already row-major, so each
  weight gradient x^T g (contracting the batch*length axis, dim 0 of both operands) either
  materialises a transposed copy of an activation or gradient first (up to [V, B*T] for the
  tied unembedding) or falls back to an Eigen dot; oneDNN reads transposed operands in place.
  `--xla-preset default` runs jaxlib's defaults.
* `--allocator` (re-executes the script under it; both sides share the process, so both get
  it). XLA:CPU allocates the step's ~2 GB of temporaries afresh on every call; glibc serves
  blocks over 32 MiB with a fresh mmap and unmaps them on free, so every step page-faults
  its temporaries in again (~30 s of kernel time per minute of benchmark).
  `tcmalloc` (the default when found; Debian package `libtcmalloc-minimal4`) keeps freed
  memory for reuse: llm_jax 5.75 -> 3.48 s/step, HF 3.06 -> 2.62 s/step on this machine.
  `hugepages` (the fallback) keeps glibc with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`
  (transparent huge pages, ~300x fewer faults, but still a fresh mapping per step);
  `system` changes nothing.

Ceiling: the last lines print the step time llm_jax would have at 100% of the large dot's
FLOP/s and the ratio over HF that it would give; no real step reaches the peak, so a target
ratio above that ceiling cannot be met with this backend's kernels on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Appended to XLA_FLAGS before JAX starts (XLA reads it once, at backend creation).
XLA_PRESETS = {
    "default": "",
    "onednn": (
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,individual_dot"
    ),
}
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side (alternating)")
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lax.scan over layers, as configs/gpt2_small.yaml (default: on)",
    )
    p.add_argument("--remat", default="none", help="remat policy (none|full|dots|dots_no_batch)")
    p.add_argument("--xla-preset", choices=sorted(XLA_PRESETS), default="onednn")
    p.add_argument(
        "--allocator",
        choices=("auto", "tcmalloc", "hugepages", "system"),
        default="auto",
        help="malloc for both sides (re-executes the script): auto = tcmalloc when found, "
        f"else glibc with GLIBC_TUNABLES={HUGEPAGE_TUNABLE}",
    )
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after timing, trace 2 llm_jax steps with jax.profiler into DIR and print the "
        "ops that take the most time (adds --xla_cpu_enable_xprof_traceme=true)",
    )
    return p.parse_args()


def configure_process(args: argparse.Namespace) -> None:
    """Apply the process-wide settings; must run before a JAX backend exists or torch is
    imported (XLA reads XLA_FLAGS when it creates the backend)."""
    from llm_jax.train.allocator import find_tcmalloc

    # The dynamic loader and glibc read these at process start only, hence the re-exec.
    allocator = args.allocator
    tcmalloc = find_tcmalloc()
    if allocator == "auto":
        allocator = "tcmalloc" if tcmalloc else "hugepages"
    if allocator == "tcmalloc" and tcmalloc is None:
        sys.exit("--allocator tcmalloc: no tcmalloc found; apt-get install libtcmalloc-minimal4")
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "")
    tunables = env.get("GLIBC_TUNABLES", "")
    if allocator == "tcmalloc" and tcmalloc not in preload:
        env["LD_PRELOAD"] = ":".join(filter(None, [tcmalloc, preload]))
    if allocator == "hugepages" and HUGEPAGE_TUNABLE not in tunables:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, HUGEPAGE_TUNABLE]))
    if env != os.environ:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    args.allocator = allocator
    flags = XLA_PRESETS[args.xla_preset]
    if args.profile:  # per-op trace events on XLA:CPU
        flags = f"{flags} --xla_cpu_enable_xprof_traceme=true".strip()
    if flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def make_llm_jax_step(cfg, batch: dict):
    """A zero-argument function running one donated llm_jax train step; compile seconds."""
    import jax

    from llm_jax.parallel import MeshConfig, make_mesh
    from llm_jax.train.compile import compile_steps, state_layout
    from llm_jax.train.optimizer import OptimizerConfig

    opt = OptimizerConfig(
        learning_rate=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.01, b2=0.999
    )
    layout = state_layout(cfg, opt, make_mesh(MeshConfig(), jax.devices()[:1]), total_steps=100)
    holder = {"state": layout.init()}
    t0 = time.perf_counter()
    steps = compile_steps(layout, "clm", batch)
    compile_s = time.perf_counter() - t0
    batch = layout.put_batch(batch)

    def step() -> float:
        holder["state"], metrics = steps.train(holder["state"], batch)
        return float(metrics["loss"])

    return step, compile_s


def make_torch_step(cfg, tokens):
    """A zero-argument function running one HF GPT2LMHeadModel + AdamW step."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_position_embeddings,
        n_embd=cfg.d_model,
        n_layer=cfg.num_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.d_ff,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(hf_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    inputs = torch.from_numpy(tokens).long()

    def step() -> float:
        loss = model(inputs, labels=inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def matmul_flops(n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of the fastest of `reps` jitted [n, n] @ [n, n] fp32 products."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = min(timed(lambda: dot(a, b).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best


def profile_top(step, out_dir: str, steps: int = 2, top: int = 15) -> None:
    """Trace `steps` calls of `step` and print op time per kind and the `top` ops."""
    import collections
    import glob
    import gzip
    import json
    import re

    import jax

    with jax.profiler.trace(out_dir, create_perfetto_trace=True):
        for _ in range(steps):
            step()
    path = max(glob.glob(f"{out_dir}/**/*.trace.json.gz", recursive=True), key=os.path.getmtime)
    ops, kinds, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for e in json.load(gzip.open(path))["traceEvents"]:
        name = e.get("name", "")
        # XLA ops only (lower-case HLO names): not host-side events or Python frames, nor
        # the control-flow ops that contain other ops.
        if e.get("ph") != "X" or not re.fullmatch(r"[a-z][\w.-]*", name):
            continue
        if re.match(r"(while|call|conditional)\b", name):
            continue
        ops[name] += e.get("dur", 0) / steps
        calls[name] += 1 / steps
        kind = re.sub(r"\.\d+$", "", name)
        kinds["oneDNN/YNN dots" if kind.startswith(("onednn", "ynn")) else kind] += (
            e.get("dur", 0) / steps
        )
    total = sum(ops.values())
    print(f"\nprofile ({path}): op time {total / 1e3:,.0f} ms per step (summed over threads)")
    for kind, us in kinds.most_common(8):
        print(f"  {100 * us / total:5.1f}%  {us / 1e3:9,.1f} ms  {kind}")
    print("  top ops:")
    for name, us in ops.most_common(top):
        print(f"  {100 * us / total:5.1f}%  {us / 1e3:9,.1f} ms  {calls[name]:4.0f}x  {name}")


def main() -> None:
    args = parse_args()
    configure_process(args)

    # Imported only now: XLA_FLAGS must be final before JAX creates its CPU backend.
    import jax
    import numpy as np

    from llm_jax.models import ModelConfig
    from llm_jax.train.flops import model_flops_per_token

    cfg = ModelConfig.preset(
        args.preset,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        scan_layers=args.scan_layers,
        remat_policy=args.remat,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((args.batch, args.seq), np.float32),
    }
    n_tok = args.batch * args.seq
    cores = len(os.sched_getaffinity(0))
    print(
        f"{args.preset} fp32, batch {args.batch}x{args.seq}, AdamW, scan_layers="
        f"{args.scan_layers}, remat={args.remat}; {cores} usable CPU cores "
        f"({os.cpu_count()} online); jax {jax.__version__} on {jax.devices()[0].device_kind}"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} (preset {args.xla_preset!r})")
    print(
        f"allocator {args.allocator!r}: LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )

    sides = {}
    ours, compile_s = make_llm_jax_step(cfg, batch)
    sides["llm_jax (jit, scan, donated)" if args.scan_layers else "llm_jax (jit, donated)"] = ours
    if not args.skip_torch:
        import torch

        torch.set_num_threads(cores)
        print(
            f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads, "
            f"{torch.get_num_interop_threads()} inter-op; XLA:CPU: one intra-op pool "
            f"sized to the {cores} usable cores"
        )
        sides[f"HF GPT2LMHeadModel (torch {torch.__version__})"] = make_torch_step(
            cfg, tokens[:, :-1]
        )
    losses = {name: step() for name, step in sides.items()}  # warm-up (allocation)
    times = {name: [] for name in sides}
    for _ in range(args.steps):
        for name, step in sides.items():
            times[name].append(timed(step))

    print(
        f"\nllm_jax compile: {compile_s:.1f} s; first-step loss: "
        + ", ".join(f"{name.split(' (')[0]} {loss:.4f}" for name, loss in losses.items())
    )
    print(f"{'side':<44} {'median s/step':>14} {'min':>8} {'max':>8} {'tokens/s':>10}")
    tps = {}
    for name, ts in times.items():
        tps[name] = n_tok / statistics.median(ts)
        print(
            f"{name:<44} {statistics.median(ts):>14.3f} {min(ts):>8.3f} {max(ts):>8.3f} "
            f"{tps[name]:>10,.0f}"
        )
    names = list(sides)
    if len(names) == 2:
        best_ratio = min(times[names[1]]) / min(times[names[0]])
        print(
            f"ratio llm_jax / HF (median): {tps[names[0]] / tps[names[1]]:.2f}x; "
            f"(best step): {best_ratio:.2f}x  (target >= 1.3x)"
        )

    flops_tok = model_flops_per_token(cfg, args.seq)
    achieved = flops_tok * tps[names[0]]
    peak = matmul_flops()
    print(f"\nmodel FLOPs per token (6N + attention): {flops_tok / 1e9:.3f} GFLOP")
    print(
        f"llm_jax achieved (median step): {achieved / 1e9:.1f} GFLOP/s; large jnp.dot "
        f"(2048^2 fp32): {peak / 1e9:.1f} GFLOP/s; fraction {achieved / peak:.2f}  "
        f"(target >= 0.5)"
    )
    ideal = n_tok * flops_tok / peak
    line = f"ceiling: at 100% of the large dot's FLOP/s llm_jax would take {ideal:.3f} s/step"
    if len(names) == 2:
        line += f", {statistics.median(times[names[1]]) / ideal:.2f}x HF's median step"
    print(line)
    if args.profile:
        profile_top(ours, args.profile)


if __name__ == "__main__":
    main()
