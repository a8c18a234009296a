"""Decoding speed: llm_jax `generate` vs Hugging Face `generate`, same weights, same CPU.

    pip install -e ".[hf]"   # torch==2.13.0 (CPU wheel), transformers
    python benchmarks/decode.py [--repeats 5] [--cases greedy1,greedy8,sample1,beam4]

Both sides decode GPT-2 small in fp32 from the same randomly initialised weights: a
`GPT2LMHeadModel(GPT2Config())` built with a fixed torch seed, saved as safetensors and
loaded into our `GPT` with `lj.convert.load_hf`. Prompts are 16 random token ids (no
padding), EOS is off on both sides so every call generates exactly max_new_tokens, and HF
runs `model.generate(..., use_cache=True)` under `torch.inference_mode()` with
`torch.set_num_threads(<usable cores>)`, the cores XLA:CPU's pool uses.
The greedy cases assert that both sides produce the same tokens.

Cases (targets: llm_jax tokens/s over HF's):
    greedy1  greedy, batch 1, 128 new tokens    >= 1.5x, and >= 75% of the floor
    greedy8  greedy, batch 8, 128 new tokens    >= 2x
    sample1  T=0.8, top-k 50, top-p 0.95, batch 1, 128 new tokens    >= 1.5x
    beam4    4 beams, batch 1, 64 new tokens    >= 3x

Quantized cases (llm_jax with `lj.compress.quantize`: int8 per output channel, int4 with
groups of 128; tokens/s of the quantized llm_jax over HF fp32, and over PyTorch's dynamic
int8 (`torch.ao.quantization.quantize_dynamic` on every Linear, GPT-2's Conv1D rewritten as
Linear), all from the same weights in the same run; llm_jax fp32 is timed alongside):
    greedy1-int8   greedy, batch 1, 128 new tokens    >= 1.6x HF fp32, >= 1.2x torch int8
    greedy1-int4   greedy, batch 1, 128 new tokens    >= 2.2x HF fp32
    greedy8-int8   greedy, batch 8, 128 new tokens    >= 1.6x HF fp32, >= 1.2x torch int8
Their table adds the weight bytes read per token and the fraction of the bandwidth floor
those bytes set, and how many greedy tokens equal HF fp32's (quantization changes some);
before it, a summary of one quantized decode step's optimized HLO: its fusion kinds and
the f32 buffers of a weight's shape it produces (a dequantized copy of a weight).

Timing: after a first (cold) call each, the sides' calls alternate (ours, ours prepared,
theirs, ours, ...) so load from other processes on a shared machine falls on all alike;
the table shows the best of --repeats calls and the spread (median / best - 1). The
kernel's CPU pressure is printed at the start and the end: on a busy 2-core machine
torch's two OpenMP threads slow down far more than XLA's (spinning barriers), which
flatters the ratios; compare runs with low pressure. "prepared" decodes with
`lj.sample.as_decoder(model)`, which on XLA:CPU cuts the stacked layer weights per layer
once instead of once per `generate` call. tokens/s counts the
generated tokens of the returned sequences (batch x new tokens; beams are not counted).
"first call" is the cold call's wall time (llm_jax: compile + run; HF: first run), and
"first token" is the cold time to the first generated token through the streaming path
(llm_jax `stream`, compile included; HF `generate(streamer=...)`).

For context it also prints the speed of both libraries' matmul kernels on the decode
shapes, x[M, 768] @ W[768, 3072] for M = 1, 4, 8 (batch 1, 4 beams, batch 8): both sides
of every case spend most of their time there.

The ceiling: `weight_pass_ms` times one decode step's weight products alone (the 48 layer
products and the head, each waiting for the previous one as in decoding) on XLA's and
torch's kernels, for the M = batch x beams rows of each case, with the weights stored
either way round ([in, out], read by x @ W, or [out, in], read by x @ W^T as our CPU
decoders store them) and the faster of the two kept per library. No decoder built on
XLA:CPU's kernels can take less per step, so HF's time per step over it bounds the ratio
any implementation on this backend can reach; the last lines print that bound per case.

The floor: decoding one token at batch 1 must read every weight once (all parameters
except the position table, of which one row is read). Its time is weight bytes / memory
bandwidth, with the bandwidth of a large fp32 matrix-vector product measured in the same
run (the best of XLA's and torch's, each the faster of the matrix stored [in, out] and
[out, in]); the fraction printed is floor / our time per token.
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
QUANT_CASES = ("greedy1-int8", "greedy1-int4", "greedy8-int8")
PROMPT_LEN = 16


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    new_tokens: int
    strategy: str  # greedy | sample | beam
    target: float
    bits: int = 0  # weight-only quantization of our model (lj.compress.quantize); 0: fp32
    target_torch_int8: float = 0.0  # quantized cases: the target over torch dynamic int8


CASE_TABLE = {
    "greedy1": Case("greedy1", 1, 128, "greedy", 1.5),
    "greedy8": Case("greedy8", 8, 128, "greedy", 2.0),
    "sample1": Case("sample1", 1, 128, "sample", 1.5),
    "beam4": Case("beam4", 1, 64, "beam", 3.0),
    "greedy1-int8": Case("greedy1-int8", 1, 128, "greedy", 1.6, 8, 1.2),
    "greedy1-int4": Case("greedy1-int4", 1, 128, "greedy", 2.2, 4),
    "greedy8-int8": Case("greedy8-int8", 8, 128, "greedy", 1.6, 8, 1.2),
}
INT4_GROUP_SIZE = 128
TEMPERATURE, TOP_K, TOP_P, NUM_BEAMS = 0.8, 50, 0.95, 4


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side and case")
    p.add_argument(
        "--cases",
        default=",".join(CASES + QUANT_CASES),
        help=f"comma-separated of {CASES + QUANT_CASES}",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(args.cases) - set(CASES) - set(QUANT_CASES))
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {list(CASES + QUANT_CASES)}")
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


def matvec_bandwidth(repeats: int = 20, sides=("xla", "torch")) -> dict[str, float]:
    """GB/s of a [4096, 16384] fp32 matrix times a vector (256 MiB, far beyond cache), on
    each of `sides` (torch is imported only when asked for): the faster of the matrix
    stored [in, out] (x @ W) and [out, in] (x @ W^T, the layout our CPU decoders use)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    k, n = 4096, 16384
    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    gb = w.nbytes / 1e9
    wt = np.ascontiguousarray(w.T)
    w_jax, wt_jax, x_jax = jnp.asarray(w), jnp.asarray(wt), jnp.ones((1, k), jnp.float32)
    f, ft = jax.jit(lambda w, x: x @ w), jax.jit(lambda wt, x: x @ wt.T)
    calls = {
        "xla": [
            lambda: f(w_jax, x_jax).block_until_ready(),
            lambda: ft(wt_jax, x_jax).block_until_ready(),
        ]
    }
    if "torch" in sides:
        import torch

        w_t, wt_t, x_t = torch.from_numpy(w), torch.from_numpy(wt), torch.ones(1, k)
        calls["torch"] = [lambda: x_t @ w_t, lambda: x_t @ wt_t.T]
    out = {}
    for name in sides:
        best = float("inf")
        for call in calls[name]:
            call()
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


def cpu_pressure() -> str:
    """The kernel's CPU pressure (share of time some runnable task waited), if exposed."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
    except OSError:
        return "n/a"
    fields = dict(item.split("=") for item in some[1:])
    return f"{fields['avg10']}% (10 s), {fields['avg60']}% (60 s)"


def timed(call) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def run_case(case: Case, ours_model, prepared, hf_model, repeats: int, seed: int) -> dict:
    """Cold calls, then `repeats` rounds of (ours, ours prepared, HF) timed calls."""
    import numpy as np

    rng = np.random.default_rng(seed + case.batch)
    prompt = rng.integers(0, ours_model.cfg.vocab_size, (case.batch, PROMPT_LEN), dtype=np.int32)
    calls = {
        "ours": make_ours(ours_model, case, prompt, seed),
        "prep": make_ours(prepared, case, prompt, seed),
        "hf": make_hf(hf_model, case, prompt),
    }
    first, tokens, times = {}, {}, {name: [] for name in calls}
    for name, call in calls.items():
        first[name], tokens[name] = timed(call)
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call)[0])
    ours_tokens, hf_tokens = np.asarray(tokens["ours"]), tokens["hf"]
    assert np.array_equal(np.asarray(tokens["prep"]), ours_tokens)
    if case.strategy == "greedy" and not np.array_equal(ours_tokens, hf_tokens):
        rows, cols = np.nonzero(ours_tokens != hf_tokens)
        raise AssertionError(
            f"{case.name}: llm_jax and HF greedy tokens differ first at row {rows[0]}, step "
            f"{cols[0]} ({ours_tokens[rows[0], cols[0]]} vs {hf_tokens[rows[0], cols[0]]})"
        )
    generated = case.batch * case.new_tokens
    return {
        "case": case,
        "first": first,
        "best": {name: min(t) for name, t in times.items()},
        "spread": {name: statistics.median(t) / min(t) - 1 for name, t in times.items()},
        "tps": {name: generated / min(t) for name, t in times.items()},
        "beam_same": (
            bool(np.array_equal(ours_tokens[:, 0], hf_tokens)) if case.strategy == "beam" else None
        ),
    }


def torch_dynamic_int8(hf_model):
    """HF's model with PyTorch's own dynamic int8 (`torch.ao.quantization.quantize_dynamic`)
    on its Linear layers. GPT-2's blocks use transformers' Conv1D (a transposed Linear), so
    those are first rewritten as nn.Linear with the same weights, or only the head would
    be quantized."""
    import copy

    import torch
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(hf_model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.nf)
                linear.weight.data = child.weight.data.T.contiguous()
                linear.bias.data = child.bias.data
                setattr(module, name, linear)
    return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def run_quant_case(case: Case, decoders: dict, hf_models: dict, repeats: int, seed: int) -> dict:
    """Cold calls, then `repeats` rounds alternating llm_jax fp32 / quantized (prepared
    decoders) and HF fp32 / torch dynamic int8, on one prompt."""
    import numpy as np

    rng = np.random.default_rng(seed + case.batch)
    vocab = decoders["fp32"].info.vocab_size
    prompt = rng.integers(0, vocab, (case.batch, PROMPT_LEN), dtype=np.int32)
    calls = {name: make_ours(d, case, prompt, seed) for name, d in decoders.items()}
    calls.update({name: make_hf(m, case, prompt) for name, m in hf_models.items()})
    tokens, times = {}, {name: [] for name in calls}
    for name, call in calls.items():
        tokens[name] = call()
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call)[0])
    assert np.array_equal(np.asarray(tokens["fp32"]), tokens["hf"]), "fp32 sides disagree"
    generated = case.batch * case.new_tokens
    same = {n: float(np.mean(np.asarray(tokens[n]) == tokens["hf"])) for n in ("quant", "hf-int8")}
    # A line as each case ends: under load the whole run takes long.
    rates = ", ".join(f"{name} {generated / min(t):.1f}" for name, t in times.items())
    print(f"{case.name} done: tokens/s {rates}", flush=True)
    return {
        "case": case,
        "tps": {name: generated / min(t) for name, t in times.items()},
        "spread": {name: statistics.median(t) / min(t) - 1 for name, t in times.items()},
        "same": same,
    }


def decode_step_hlo(decoder, batch: int) -> str:
    """The optimized HLO text of one cached decode step (T = 1) of a prepared decoder."""
    import jax
    import jax.numpy as jnp

    cache = decoder.init_cache(batch, PROMPT_LEN + 8)
    ones = jnp.ones((batch, 1), jnp.int32)
    step = jax.jit(lambda d, t, p, s, c: d.tokens_to_logits(t, p, s, c))
    return step.lower(decoder, ones, ones, ones, cache).compile().as_text()


def hlo_summary(text: str) -> str:
    """Fusion kinds in a compiled step, the f32 buffers of a GPT-2 weight's shape (a
    dequantized weight materialised before its product) and the quantized kernel's calls."""
    import re
    from collections import Counter

    kinds = Counter(re.findall(r"fusion\(.*?kind=(k\w+)", text))
    weight_shapes = ("768,2304", "768,12,64", "768,768", "12,64,768", "768,3072", "3072,768")
    weight_shapes += ("768,50257", "50257,768")
    # Top-level fusion instructions only (their results are buffers; lines inside a fused
    # computation are not).
    outputs = re.findall(r"= f32\[([\d,]+)\][^ ]* fusion\(.*kind=k\w+", text)
    materialised = Counter(shape for shape in outputs if shape in weight_shapes)
    kernel_calls = text.count('custom_call_target="llm_jax_qmatmul"')
    return (
        f"fusions {dict(kinds)}; f32 weight-shaped buffers produced: {dict(materialised)}; "
        f"int8/int4 kernel calls (llm_jax.kernels.qmatmul): {kernel_calls}"
    )


def print_quant_rows(rows: list[dict], wbytes: dict[int, int], best_bw: float) -> None:
    """The quantized cases' table: llm_jax fp32 / int8|int4 vs HF fp32 / torch int8."""
    print(
        "\nweight-only quantized llm_jax (lj.compress.quantize; int4 group size "
        f"{INT4_GROUP_SIZE}) vs HF fp32 and torch dynamic int8 (quantize_dynamic on every "
        "Linear), prepared decoders; ratios are the quantized llm_jax over the other side."
    )
    header = (
        f"{'case':<14}{'lj fp32':>9}{'lj quant':>10}{'HF fp32':>9}{'torch i8':>10}"
        f"{'/HF':>7}{'/torch i8':>10}{'target':>13}{'':<5}{'MB/token':>8}{'floor':>7}"
        f"{'same tokens as HF fp32 (lj quant / torch i8)':>46}"
    )
    print(header + "\n" + "-" * len(header))
    for r in rows:
        case, tps = r["case"], r["tps"]
        vs_hf, vs_t8 = tps["quant"] / tps["hf"], tps["quant"] / tps["hf-int8"]
        ok = vs_hf >= case.target and vs_t8 >= case.target_torch_int8
        target = f"{case.target}x/{case.target_torch_int8 or '-'}x"
        floor_ms = wbytes[case.bits] / (best_bw * 1e9) * 1e3
        frac = floor_ms / (case.batch * 1e3 / tps["quant"])  # per step of the batch
        same = f"{r['same']['quant']:.0%} / {r['same']['hf-int8']:.0%}"
        print(
            f"{case.name:<14}{tps['fp32']:>9.1f}{tps['quant']:>10.1f}{tps['hf']:>9.1f}"
            f"{tps['hf-int8']:>10.1f}{vs_hf:>6.2f}x{vs_t8:>9.2f}x{target:>12} "
            f"{'ok' if ok else 'MISS':<5}"
            f"{wbytes[case.bits] / 1e6:>8.1f}{frac:>7.0%}{same:>46}"
        )
    print("tok/s; floor = the quantized weights' bytes / matvec bandwidth over the time per step")


def gemm_rates(repeats: int = 10) -> dict[str, dict[int, float]]:
    """GFLOP/s of x[M, 768] @ W[768, 3072] over 24 weights (226 MB), XLA and torch, M=1/4/8."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    k, n, count = 768, 3072, 24
    ws = [np.random.default_rng(i).standard_normal((k, n), dtype=np.float32) for i in range(count)]
    jws, tws = [jnp.asarray(w) for w in ws], [torch.from_numpy(w) for w in ws]
    chain = jax.jit(lambda ws, x: [x @ w for w in ws])
    out: dict[str, dict[int, float]] = {"xla": {}, "torch": {}}
    for m in (1, 4, 8):
        x_jax, x_t = jnp.ones((m, k), jnp.float32), torch.ones(m, k)
        calls = {
            "xla": lambda x=x_jax: jax.block_until_ready(chain(jws, x)),
            "torch": lambda x=x_t: [x @ w for w in tws],
        }
        for name, call in calls.items():
            call()
            best = min(timed(call)[0] for _ in range(repeats))
            out[name][m] = 2 * m * k * n * count / best / 1e9
    return out


def weight_pass_ms(rows=(1, 4, 8), repeats: int = 10) -> dict[int, dict[str, float]]:
    """Milliseconds of one decode step's weight products alone, XLA and torch, for x with
    M rows (M = batch x beams: 1 greedy/sampling, 4 the beams, 8 batch 8).

    GPT-2 small's per-step dependency chain, in order: per layer x @ W for W = qkv
    [768, 2304], out [768, 768], fc [768, 3072], proj [3072, 768]; then the tied head,
    x @ wte^T with wte [50257, 768] as stored. Each product needs the previous one's output
    (sliced or zero-padded to 768 or 3072 columns), as in decoding, so no two run at once.
    Nothing else a decoder does (norms, attention, sampling) is counted: a decoder built on
    these kernels cannot beat this time.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    shapes = [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12
    ws = [rng.standard_normal(s, dtype=np.float32) * 0.02 for s in shapes]
    head = rng.standard_normal((50257, 768), dtype=np.float32) * 0.02

    def chain(mm, ws, head, x, fit):
        for w in ws:
            x = mm(fit(x, w.shape[0]), w)
        return mm(fit(x, 768), head.T)

    def fit_jax(y, k):
        return y[:, :k] if y.shape[1] >= k else jnp.pad(y, ((0, 0), (0, k - y.shape[1])))

    def fit_torch(y, k):
        return y[:, :k] if y.shape[1] >= k else torch.nn.functional.pad(y, (0, k - y.shape[1]))

    def chain_t(mm, wts, head, x, fit):  # the same products, weights stored [out, in]
        for wt in wts:
            x = mm(fit(x, wt.shape[1]), wt.T)
        return mm(fit(x, 768), head.T)

    jws, jhead = [jnp.asarray(w) for w in ws], jnp.asarray(head)
    jwts = [jnp.asarray(np.ascontiguousarray(w.T)) for w in ws]
    xla = jax.jit(lambda ws, head, x: chain(jnp.matmul, ws, head, x, fit_jax))
    xla_t = jax.jit(lambda wts, head, x: chain_t(jnp.matmul, wts, head, x, fit_jax))
    tws, thead = [torch.from_numpy(w) for w in ws], torch.from_numpy(head)
    twts = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in ws]
    out: dict[int, dict[str, float]] = {}
    for m in rows:
        x_jax, x_t = jnp.ones((m, 768), jnp.float32), torch.ones(m, 768)
        calls = {
            "xla": [
                lambda x=x_jax: xla(jws, jhead, x).block_until_ready(),
                lambda x=x_jax: xla_t(jwts, jhead, x).block_until_ready(),
            ],
            "torch": [
                lambda x=x_t: chain(torch.matmul, tws, thead, x, fit_torch),
                lambda x=x_t: chain_t(torch.matmul, twts, thead, x, fit_torch),
            ],
        }
        out[m] = {}
        with torch.inference_mode():
            for name, layouts in calls.items():
                for call in layouts:
                    call()
                out[m][name] = min(timed(call)[0] for call in layouts for _ in range(repeats)) * 1e3
    return out


def ceiling_ratio(row: dict, weight_pass: dict[int, dict[str, float]]) -> float:
    """HF's ms per decode step over XLA's weight products for that step's rows."""
    case = row["case"]
    m = case.batch * (NUM_BEAMS if case.strategy == "beam" else 1)
    return row["best"]["hf"] / case.new_tokens * 1e3 / weight_pass[m]["xla"]


def quant_cases(args, ours_model, prepared, hf_model, best_bw: float):
    """Run the quantized cases asked for: (rows, weight bytes per token by bits, bandwidth),
    or None; prints the optimized HLO summary of each quantized decode step."""
    import llm_jax as lj

    names = [n for n in args.cases if n in QUANT_CASES]
    if not names:
        return None
    hf_int8 = torch_dynamic_int8(hf_model)
    wanted = sorted({CASE_TABLE[n].bits for n in names})
    models = {
        bits: lj.compress.quantize(
            ours_model, bits=bits, group_size=INT4_GROUP_SIZE if bits == 4 else None
        )
        for bits in wanted
    }
    wbytes = {0: weight_bytes(ours_model), **{b: weight_bytes(m) for b, m in models.items()}}
    decoders = {bits: lj.sample.as_decoder(m) for bits, m in models.items()}
    for bits, decoder in decoders.items():
        summary = hlo_summary(decode_step_hlo(decoder, 1))
        print(f"int{bits} decode step (batch 1), optimized HLO: {summary}")
    print(f"fp32 decode step (batch 1), optimized HLO: {hlo_summary(decode_step_hlo(prepared, 1))}")
    rows = []
    for name in names:
        case = CASE_TABLE[name]
        ours = {"fp32": prepared, "quant": decoders[case.bits]}
        theirs = {"hf": hf_model, "hf-int8": hf_int8}
        rows.append(run_quant_case(case, ours, theirs, args.repeats, args.seed))
    return rows, wbytes, best_bw


def main() -> int:
    args = parse_args()
    import jax
    import numpy as np
    import torch
    import transformers

    import llm_jax.sample as sample

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)  # XLA:CPU sizes its intra-op pool to the usable cores too
    print(
        f"jax {jax.__version__} ({jax.default_backend()}, XLA:CPU intra-op threads = {cores} "
        f"cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); transformers {transformers.__version__}"
    )
    print(f"CPU pressure from other processes at start: {cpu_pressure()}")
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
    rates = gemm_rates()
    print(
        "x[M,768] @ W[768,3072] kernels, GFLOP/s (GB/s of weights) for M=1/4/8: "
        + "; ".join(
            f"{name} "
            + " / ".join(f"{r:.0f} ({r / (2 * m) * 4:.0f})" for m, r in rates[name].items())
            for name in ("xla", "torch")
        )
    )
    weight_pass = weight_pass_ms()
    print(
        "one decode step's weight products alone, x[M, .] for M = 1/4/8 (dependent chain, see "
        "weight_pass_ms), ms: "
        + "; ".join(
            f"{name} " + " / ".join(f"{weight_pass[m][name]:.1f}" for m in weight_pass)
            for name in ("xla", "torch")
        )
    )
    ttft = first_token_seconds(ours_model, hf_model, np.zeros((1, PROMPT_LEN), np.int32) + 464)
    print(
        f"first token, cold (stream, greedy, batch 1): llm_jax {ttft[0]:.2f} s (compile "
        f"included), HF {ttft[1]:.2f} s"
    )
    t0 = time.perf_counter()
    prepared = sample.as_decoder(ours_model)
    jax.block_until_ready(prepared)
    print(f"lj.sample.as_decoder(model): {time.perf_counter() - t0:.2f} s (compile included)")

    quant_rows = quant_cases(args, ours_model, prepared, hf_model, best_bw)
    rows = [
        run_case(CASE_TABLE[name], ours_model, prepared, hf_model, args.repeats, args.seed)
        for name in args.cases
        if name in CASES
    ]
    print(
        "\nllm_jax = generate(model, ...); prepared = generate(lj.sample.as_decoder(model), ...). "
        "Ratios are over HF; best of the timed calls, spread = median / best - 1."
    )
    header = (
        f"{'case':<9}{'tok/s llm_jax':>14}{'prepared':>10}{'HF':>8}{'ratio':>8}{'prepared':>10}"
        f"{'target':>8}{'ms/token ours/prep/HF':>24}{'spread':>14}{'first call ours/HF s':>22}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        case, tps, best, spread = r["case"], r["tps"], r["best"], r["spread"]
        ratio, ratio_prep = tps["ours"] / tps["hf"], tps["prep"] / tps["hf"]
        mark = "ok" if max(ratio, ratio_prep) >= case.target else "MISS"
        ms = "/".join(f"{best[n] / case.new_tokens * 1e3:.1f}" for n in ("ours", "prep", "hf"))
        spreads = "/".join(f"{spread[n] * 100:.0f}%" for n in ("ours", "prep", "hf"))
        first = f"{r['first']['ours']:.2f}/{r['first']['hf']:.2f}"
        print(
            f"{case.name:<9}{tps['ours']:>14.1f}{tps['prep']:>10.1f}{tps['hf']:>8.1f}"
            f"{ratio:>7.2f}x{ratio_prep:>9.2f}x{case.target:>6.1f}x {mark:<4}{ms:>19}"
            f"{spreads:>14}{first:>22}"
        )
    print(
        "ceiling: HF's time per step over the weight products alone on XLA's kernels (M rows: "
        "a decoder on them cannot go faster): "
        + "; ".join(
            f"{r['case'].name} {ceiling_ratio(r, weight_pass):.2f}x (target {r['case'].target}x)"
            for r in rows
        )
    )
    for r in rows:
        case, best = r["case"], r["best"]
        if case.name == "greedy1":
            per_token = {n: best[n] / case.new_tokens * 1e3 for n in best}
            print(
                f"\ngreedy batch 1 vs the floor ({floor_ms:.1f} ms/token): llm_jax "
                f"{floor_ms / per_token['ours']:.0%}, prepared {floor_ms / per_token['prep']:.0%}"
                f", HF {floor_ms / per_token['hf']:.0%} (target >= 75%; prefill included)"
            )
            print(
                f"greedy batch 1 ceiling on XLA's kernels: {floor_ms / weight_pass[1]['xla']:.0%} "
                "of the floor (the weight products alone, no other work)"
            )
        if r["beam_same"] is not None:
            print(f"beam 4: best beam identical to HF's: {r['beam_same']}")
    if rows:
        print("greedy tokens identical to HF in every fp32 greedy case (asserted)")
    if quant_rows:
        print_quant_rows(*quant_rows)
    print(f"CPU pressure from other processes at the end: {cpu_pressure()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
