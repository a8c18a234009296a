"""Same-backend peer: llm_jax's GPT-2 vs KerasHub's GPT-2 (Keras 3 on the same jax), one CPU.

    pip install -e ".[peers]"   # keras-hub 0.32 (pulls Keras 3; jax stays as installed)
    python benchmarks/peers.py [--phases train,decode] [--steps 6] [--repeats 5]

Both libraries run on XLA:CPU through the same jax, so the ratios isolate our own code
(model, loss, train step, decoding loop) from the kernels. Same shapes on both sides,
random weights on both (each library's own initialiser; the work does not depend on the
values: dropout off, EOS off), fp32.

Phases (each in its own process, because XLA reads XLA_FLAGS once, when the backend starts):

* train: one optimizer step on a [batch, seq] batch (default 4x256): llm_jax's jitted,
  donated `train_step` (as `benchmarks/train_step.py` builds it) and `GPT2CausalLM.
  train_on_batch` (Keras' jitted train step; AdamW with the same lr, weight decay and betas;
  sparse cross-entropy from logits; no metrics). Run with the oneDNN dot flags
  (`train_step.py`'s preset): they speed up both sides' weight gradients.
* decode: greedy generation of --new-tokens tokens after a --prompt-token prompt at batch 1
  and 8: `lj.sample.generate(lj.sample.as_decoder(model), ...)` and `GPT2CausalLM.generate`
  (`sampler="greedy"`, `stop_token_ids=None`, inputs padded to prompt + new tokens, as
  KerasHub's own preprocessing does). Run with jaxlib's default XLA flags: with the oneDNN
  flags batch-1 decoding on both sides is slower (measured 0.87x instead of 1.23x ours over
  KerasHub), and each side should run under its best settings.

Both phases run under tcmalloc when it is found (see `train_step.py --allocator`). After a
cold call each (compilation), the sides alternate (ours, theirs, ours, ...) so load from
other processes falls on both alike; tables show the median and best wall time and the
process CPU seconds per call (less sensitive to a busy machine than wall time). The last
lines print each ratio (ours over KerasHub, > 1 = faster) next to its target: train step
>= 1.2x, greedy decode >= 1.4x at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PHASES = ("train", "decode")
# Appended to XLA_FLAGS per phase; see the docstring for why they differ.
PHASE_FLAGS = {
    "train": (
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,individual_dot"
    ),
    "decode": "",
}
TARGETS = {"train": 1.2, "greedy1": 1.4, "greedy8": 1.4}
RESULT_TAG = "PEERS_RESULT "


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated of {PHASES}")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--preset", default="gpt2-small")
    p.add_argument("--batch", type=int, default=4, help="train batch")
    p.add_argument("--seq", type=int, default=256, help="train length")
    p.add_argument("--steps", type=int, default=6, help="timed train steps per side")
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed generate calls per side")
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="lax.scan over our layers, as configs/gpt2_small.yaml and train_step.py (default: on)",
    )
    args = p.parse_args()
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = sorted(set(args.phases) - set(PHASES))
    if unknown:
        p.error(f"unknown phases {unknown}; choose from {list(PHASES)}")
    args.decode_batches = [int(b) for b in args.decode_batches.split(",")]
    return args


def timed(fn) -> tuple[float, float]:
    """(wall s, process CPU s) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def alternate(calls: dict, n: int) -> dict[str, list[tuple[float, float]]]:
    """Time `n` calls of each side, alternating sides, after one untimed call each."""
    for fn in calls.values():
        fn()
    times = {name: [] for name in calls}
    for _ in range(n):
        for name, fn in calls.items():
            times[name].append(timed(fn))
    return times


def print_table(times: dict, work: float, unit: str) -> dict[str, float]:
    """Print median/best wall and median CPU per call and `work / median wall`; return the
    latter per side."""
    print(f"{'side':<34} {'median s':>9} {'best s':>8} {'CPU s':>8} {unit:>10}")
    rates = {}
    for name, ts in times.items():
        wall = statistics.median(t for t, _ in ts)
        rates[name] = work / wall
        print(
            f"{name:<34} {wall:>9.3f} {min(t for t, _ in ts):>8.3f} "
            f"{statistics.median(c for _, c in ts):>8.3f} {rates[name]:>10,.1f}"
        )
    return rates


def keras_gpt2(cfg, sampler: str | None = None):
    """A KerasHub `GPT2CausalLM` of `cfg`'s shapes, random weights, no preprocessor."""
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=cfg.vocab_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        hidden_dim=cfg.d_model,
        intermediate_dim=cfg.d_ff,
        dropout=0.0,
        max_sequence_length=cfg.max_position_embeddings,
    )
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    if sampler is not None:
        model.compile(sampler=sampler)
    return model


def run_train(args, cfg) -> dict:
    import keras
    import numpy as np
    from train_step import make_llm_jax_step

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {
        "tokens": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones((args.batch, args.seq), np.float32),
    }
    ours, compile_s = make_llm_jax_step(cfg, batch)
    print(f"llm_jax train step compiled in {compile_s:.1f} s")

    model = keras_gpt2(cfg)
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=1e-4, weight_decay=0.01, beta_1=0.9, beta_2=0.999, epsilon=1e-8
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        jit_compile=True,
    )
    x = {"token_ids": batch["tokens"], "padding_mask": np.ones_like(batch["tokens"], bool)}

    def theirs() -> float:
        return float(model.train_on_batch(x, batch["targets"], sample_weight=batch["weights"]))

    calls = {"llm_jax train_step": ours, "KerasHub GPT2CausalLM": theirs}
    print(
        "first-step loss: "
        + ", ".join(f"{name} {fn():.4f}" for name, fn in calls.items())
        + " (compile included)"
    )
    times = alternate(calls, args.steps)
    print(f"\ntrain step, batch {args.batch}x{args.seq}, {args.steps} alternating steps per side")
    rates = print_table(times, args.batch * args.seq, "tokens/s")
    ours_rate, theirs_rate = rates.values()
    return {"train": ours_rate / theirs_rate}


def run_decode(args, cfg) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    import llm_jax as lj

    model = lj.models.build(cfg, rngs=nnx.Rngs(0))
    t0 = time.perf_counter()
    decoder = lj.sample.as_decoder(model)
    print(f"lj.sample.as_decoder(model): {time.perf_counter() - t0:.2f} s")
    theirs_model = keras_gpt2(cfg, sampler="greedy")
    total = args.prompt + args.new_tokens
    ratios = {}
    for b in args.decode_batches:
        prompt = np.random.default_rng(b).integers(0, cfg.vocab_size, (b, args.prompt))
        prompt = prompt.astype(np.int32)
        padded = np.zeros((b, total), np.int32)
        padded[:, : args.prompt] = prompt
        inputs = {"token_ids": padded, "padding_mask": padded != 0}
        inputs["padding_mask"][:, : args.prompt] = True

        def ours(prompt=prompt):
            out = lj.sample.generate(
                decoder, prompt, max_new_tokens=args.new_tokens, strategy=lj.sample.Greedy()
            )
            return jax.device_get(out.tokens)

        def theirs(inputs=inputs):
            return theirs_model.generate(inputs, stop_token_ids=None)

        new = theirs()["token_ids"][:, args.prompt :]
        if new.shape != (b, args.new_tokens):
            raise RuntimeError(f"KerasHub generated {new.shape}, expected {(b, args.new_tokens)}")
        times = alternate({"llm_jax generate": ours, "KerasHub generate": theirs}, args.repeats)
        print(
            f"\ngreedy decode, batch {b}, prompt {args.prompt}, {args.new_tokens} new tokens, "
            f"{args.repeats} alternating calls per side"
        )
        rates = print_table(times, b * args.new_tokens, "tokens/s")
        ours_rate, theirs_rate = rates.values()
        ratios[f"greedy{b}"] = ours_rate / theirs_rate
        if b == 1:
            print_floor(model, rates)
    return ratios


def print_floor(model, rates: dict[str, float]) -> None:
    """Batch 1 against its bandwidth floor (every weight read once from memory per token):
    no decoder on this machine beats the floor, so it caps any ratio over a peer."""
    from decode import matvec_bandwidth, weight_bytes

    nbytes = weight_bytes(model)
    gbs = matvec_bandwidth(sides=("xla",))["xla"]
    floor_ms = nbytes / 1e9 / gbs * 1e3
    print(
        f"batch-1 floor: {nbytes / 1e6:.0f} MB of weights at {gbs:.1f} GB/s (XLA's fp32 "
        f"matvec) = {floor_ms:.1f} ms/token"
    )
    for name, rate in rates.items():
        ms = 1e3 / rate
        print(f"  {name:<20} {ms:6.1f} ms/token = {floor_ms / ms:4.0%} of the floor")
    theirs_ms = 1e3 / list(rates.values())[1]
    print(f"  largest possible ratio over KerasHub at the floor: {theirs_ms / floor_ms:.2f}x")


def child(args) -> None:
    import jax

    from llm_jax.models import ModelConfig

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import keras

    cfg = ModelConfig.preset(
        args.preset, dropout_rate=0.0, attention_dropout_rate=0.0, scan_layers=args.scan_layers
    )
    print(
        f"phase {args.phase}: {args.preset} fp32; jax {jax.__version__}, keras "
        f"{keras.__version__} (backend {keras.backend.backend()}), "
        f"{len(os.sched_getaffinity(0))} usable cores"
    )
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}")
    result = run_train(args, cfg) if args.phase == "train" else run_decode(args, cfg)
    print(RESULT_TAG + json.dumps(result), flush=True)


def phase_env(phase: str) -> dict[str, str]:
    """The child's environment: its XLA flags, the jax Keras backend, tcmalloc if found."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from llm_jax.train.allocator import find_tcmalloc

    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {PHASE_FLAGS[phase]}".strip()
    env["KERAS_BACKEND"] = "jax"
    env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # keras_hub imports tensorflow for its data helpers
    tcmalloc = find_tcmalloc()
    if tcmalloc and tcmalloc not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, [tcmalloc, env.get("LD_PRELOAD", "")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def main() -> None:
    args = parse_args()
    if args.phase:
        child(args)
        return
    ratios = {}
    for phase in args.phases:
        cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase]
        for key in ("preset", "batch", "seq", "steps", "prompt", "new_tokens", "repeats"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        cmd += ["--decode-batches", ",".join(map(str, args.decode_batches))]
        cmd += ["--scan-layers" if args.scan_layers else "--no-scan-layers"]
        print(f"=== phase {phase}: XLA_FLAGS += {PHASE_FLAGS[phase]!r}", flush=True)
        proc = subprocess.run(cmd, env=phase_env(phase), stdout=subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_TAG):
                ratios.update(json.loads(line[len(RESULT_TAG) :]))
            else:
                print(line)
        if proc.returncode:
            sys.exit(f"phase {phase} failed (exit {proc.returncode})")
    print("\nllm_jax / KerasHub (median wall time; > 1 = llm_jax faster):")
    for name, ratio in ratios.items():
        target = TARGETS.get(name)
        verdict = "" if target is None else f"  (target >= {target}x: "
        verdict += "" if target is None else ("met)" if ratio >= target else "MISS)")
        print(f"  {name:<8} {ratio:5.2f}x{verdict}")


if __name__ == "__main__":
    main()
