"""Decoding speed: llm_jax `generate` vs Hugging Face `generate`, same weights, same CPU.

    pip install -e ".[hf]"   # torch==2.13.0 (CPU wheel), transformers
    python benchmarks/decode.py [--repeats 5] [--cases greedy1,greedy8,sample1,beam4]

Both sides decode GPT-2 small in fp32 from the same randomly initialised weights: a
`GPT2LMHeadModel(GPT2Config())` built with a fixed torch seed, saved as safetensors and
loaded into our `GPT` with `lj.convert.load_hf`. Prompts are 16 random token ids (no
padding), EOS is off on both sides so every call generates exactly max_new_tokens, and HF
runs `model.generate(..., use_cache=True)` under `torch.inference_mode()` with
`torch.set_num_threads(2)`. The greedy cases assert that both sides produce the same tokens.

Cases (targets: llm_jax tokens/s over HF's):
    greedy1  greedy, batch 1, 128 new tokens    >= 1.5x, and >= 75% of the floor
    greedy8  greedy, batch 8, 128 new tokens    >= 2x
    sample1  T=0.8, top-k 50, top-p 0.95, batch 1, 128 new tokens    >= 1.5x
    beam4    4 beams, batch 1, 64 new tokens    >= 3x

Timing: after a first (cold) call each, the two sides' calls alternate (ours, theirs,
ours, ...) so load from other processes on a shared machine falls on both alike; the table
shows the best of --repeats calls and the spread (median / best - 1). tokens/s counts the
generated tokens of the returned sequences (batch x new tokens; beams are not counted).
"first call" is the cold call's wall time (llm_jax: compile + run; HF: first run), and
"first token" is the cold time to the first generated token through the streaming path
(llm_jax `stream`, compile included; HF `generate(streamer=...)`).

The floor: decoding one token at batch 1 must read every weight once (all parameters
except the position table, of which one row is read). Its time is weight bytes / memory
bandwidth, with the bandwidth of a large fp32 matrix-vector product measured in the same
run (the best of XLA's and torch's); the fraction printed is floor / our time per token.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

CASES = ("greedy1", "greedy8", "sample1", "beam4")
PROMPT_LEN = 16
TORCH_THREADS = 2


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    new_tokens: int
    strategy: str  # greedy | sample | beam
    target: float


CASE_TABLE = {
    "greedy1": Case("greedy1", 1, 128, "greedy", 1.5),
    "greedy8": Case("greedy8", 8, 128, "greedy", 2.0),
    "sample1": Case("sample1", 1, 128, "sample", 1.5),
    "beam4": Case("beam4", 1, 64, "beam", 3.0),
}
TEMPERATURE, TOP_K, TOP_P, NUM_BEAMS = 0.8, 50, 0.95, 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side and case")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated of {CASES}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    return args


def build_models(seed: int):
    """(HF model, our GPT) with identical fp32 weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import llm_jax as lj

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config()).eval()
    hf.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        ours = lj.convert.load_hf(tmp)
    return hf, ours


def weight_bytes(model) -> int:
    """Bytes read per decoded token: every parameter but the position table."""
    import jax
    import numpy as np
    from flax import nnx

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))
    pos = params.get("pos_embed")
    return total - (0 if pos is None else int(np.prod(pos.shape)) * pos.dtype.itemsize)


def matvec_bandwidth(repeats: int = 20) -> dict[str, float]:
    """GB/s of a [4096, 16384] fp32 matrix times a vector (256 MiB, far beyond cache)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    k, n = 4096, 16384
    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    gb = w.nbytes / 1e9
    w_jax, x_jax = jnp.asarray(w), jnp.ones((1, k), jnp.float32)
    f = jax.jit(lambda w, x: x @ w)
    f(w_jax, x_jax).block_until_ready()
    w_t, x_t = torch.from_numpy(w), torch.ones(1, k)
    out = {}
    for name, call in (
        ("xla", lambda: f(w_jax, x_jax).block_until_ready()),
        ("torch", lambda: x_t @ w_t),
    ):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
        out[name] = gb / best
    return out


def make_ours(model, case: Case, prompt, seed: int):
    import jax

    import llm_jax.sample as sample

    if case.strategy == "greedy":
        strategy, rng = sample.Greedy(), None
    elif case.strategy == "sample":
        strategy = sample.Sample(temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
        rng = jax.random.key(seed)
    else:
        strategy, rng = sample.Beam(num_beams=NUM_BEAMS), None

    def call():
        out = sample.generate(
            model, prompt, max_new_tokens=case.new_tokens, strategy=strategy, rng=rng
        )
        return jax.device_get(out.tokens)

    return call


def make_hf(model, case: Case, prompt):
    import torch

    ids = torch.from_numpy(prompt).long()
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=case.new_tokens,
        use_cache=True,
    )
    if case.strategy == "greedy":
        kwargs.update(do_sample=False, num_beams=1)
    elif case.strategy == "sample":
        kwargs.update(do_sample=True, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
    else:
        kwargs.update(do_sample=False, num_beams=NUM_BEAMS, early_stopping=False)

    def call():
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        return out[:, ids.shape[1] :].numpy()

    return call


def first_token_seconds(ours, hf, prompt) -> tuple[float, float]:
    """Cold time to the first generated token through each side's streaming path."""
    import torch

    import llm_jax.sample as sample

    t0 = time.perf_counter()
    tokens = sample.stream(ours, prompt, max_new_tokens=2)
    next(tokens)
    ours_s = time.perf_counter() - t0

    class FirstToken:
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1  # the first put is the prompt
            if self.calls == 2 and self.at is None:
                self.at = time.perf_counter()

        def end(self):
            pass

    streamer = FirstToken()
    ids = torch.from_numpy(prompt).long()
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=2,
            do_sample=False,
            streamer=streamer,
        )
    return ours_s, streamer.at - t0


def timed(call) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def run_case(case: Case, ours_model, hf_model, repeats: int, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed + case.batch)
    prompt = rng.integers(0, ours_model.cfg.vocab_size, (case.batch, PROMPT_LEN), dtype=np.int32)
    ours, hf = make_ours(ours_model, case, prompt, seed), make_hf(hf_model, case, prompt)
    ours_first, ours_tokens = timed(ours)
    hf_first, hf_tokens = timed(hf)
    ours_times, hf_times = [], []
    for _ in range(repeats):
        ours_times.append(timed(ours)[0])
        hf_times.append(timed(hf)[0])
    ours_tokens = np.asarray(ours_tokens)
    if case.strategy == "greedy":
        if not np.array_equal(ours_tokens, hf_tokens):
            rows, cols = np.nonzero(ours_tokens != hf_tokens)
            raise AssertionError(
                f"{case.name}: llm_jax and HF greedy tokens differ first at row {rows[0]}, "
                f"step {cols[0]} ({ours_tokens[rows[0], cols[0]]} vs {hf_tokens[rows[0], cols[0]]})"
            )
    beam_same = None
    if case.strategy == "beam":
        beam_same = bool(np.array_equal(ours_tokens[:, 0], hf_tokens))
    generated = case.batch * case.new_tokens
    return {
        "case": case,
        "ours_best": min(ours_times),
        "ours_spread": statistics.median(ours_times) / min(ours_times) - 1,
        "hf_best": min(hf_times),
        "hf_spread": statistics.median(hf_times) / min(hf_times) - 1,
        "ours_tps": generated / min(ours_times),
        "hf_tps": generated / min(hf_times),
        "ours_first": ours_first,
        "hf_first": hf_first,
        "beam_same": beam_same,
    }


def main() -> int:
    args = parse_args()
    import jax
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(TORCH_THREADS)
    cores = len(os.sched_getaffinity(0))
    print(
        f"jax {jax.__version__} ({jax.default_backend()}, XLA:CPU intra-op threads = {cores} "
        f"cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); transformers {transformers.__version__}"
    )
    hf_model, ours_model = build_models(args.seed)
    wbytes = weight_bytes(ours_model)
    bandwidth = matvec_bandwidth()
    best_bw = max(bandwidth.values())
    floor_ms = wbytes / (best_bw * 1e9) * 1e3
    print(
        f"gpt2-small fp32: {wbytes / 2**20:.0f} MiB of weights read per token; matvec "
        f"bandwidth XLA {bandwidth['xla']:.1f} GB/s, torch {bandwidth['torch']:.1f} GB/s -> "
        f"floor {floor_ms:.1f} ms/token at batch 1"
    )
    ttft = first_token_seconds(ours_model, hf_model, np.zeros((1, PROMPT_LEN), np.int32) + 464)
    print(
        f"first token, cold (stream, greedy, batch 1): llm_jax {ttft[0]:.2f} s (compile "
        f"included), HF {ttft[1]:.2f} s"
    )

    rows = [run_case(CASE_TABLE[name], ours_model, hf_model, args.repeats, args.seed)
            for name in args.cases]  # fmt: skip
    print()
    header = (
        f"{'case':<9}{'llm_jax tok/s':>15}{'HF tok/s':>11}{'ratio':>8}{'target':>8}"
        f"{'ms/token ours':>15}{'HF':>7}{'spread ours/HF':>16}{'first call ours/HF s':>22}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        case = r["case"]
        steps = case.new_tokens
        ratio = r["ours_tps"] / r["hf_tps"]
        mark = "ok" if ratio >= case.target else "MISS"
        print(
            f"{case.name:<9}{r['ours_tps']:>15.1f}{r['hf_tps']:>11.1f}{ratio:>7.2f}x"
            f"{case.target:>6.1f}x {mark:<4}{r['ours_best'] / steps * 1e3:>10.1f}"
            f"{r['hf_best'] / steps * 1e3:>7.1f}{r['ours_spread'] * 100:>9.0f}%/"
            f"{r['hf_spread'] * 100:.0f}%{r['ours_first']:>13.2f}/{r['hf_first']:.2f}"
        )
    for r in rows:
        case = r["case"]
        if case.name == "greedy1":
            per_token = r["ours_best"] / case.new_tokens * 1e3
            frac = floor_ms / per_token
            print(
                f"\ngreedy batch 1: {per_token:.1f} ms/token (prefill included) vs floor "
                f"{floor_ms:.1f} ms/token = {frac:.0%} of the floor (target >= 75%); HF "
                f"{floor_ms / (r['hf_best'] / case.new_tokens * 1e3):.0%}"
            )
        if r["beam_same"] is not None:
            print(f"beam 4: best beam identical to HF's: {r['beam_same']}")
    print("greedy tokens identical to HF in every greedy case (asserted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
