# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Compression: quantization, pruning, distillation
#
# One small character-level GPT is trained here on tiny-Shakespeare and then made smaller
# three ways, each measured against the original on the same held-out text:
#
# 1. **weight-only quantization** to int8 and int4 (`llm_jax.compress.quantize`): bytes,
#    greedy decode speed, held-out perplexity;
# 2. **pruning**: unstructured magnitude pruning (a sparsity vs perplexity curve) and
#    structured pruning of whole heads and MLP neurons (a genuinely smaller model);
# 3. **distillation**: a half-depth student trained from the teacher's soft targets vs the
#    same student trained from scratch.
#
# Expected run time (estimates from the step counts, not measurements of those runtimes):
# smoke mode (`LLM_JAX_SMOKE=1`, CPU) about a minute; full size 5-10 minutes on a Colab
# TPU v5e or a T4/L4 GPU (a 6-layer, 256-wide model of ~5M parameters, 1500 teacher steps
# and 2 x 600 student steps of 32 x 256 characters; compilation and the batch-1 decode
# timings, one small step per token, are a large part of it).

# %%
# Install llm_jax (and jax for a TPU/GPU runtime) unless it is already importable.
import importlib.util
import os
import shutil
import subprocess
import sys

LLM_JAX_REPO = "https://github.com/llm-jax/llm_jax"
if importlib.util.find_spec("llm_jax") is None:
    if os.path.exists("/dev/accel0") or "TPU_ACCELERATOR_TYPE" in os.environ:
        extra = ["jax[tpu]>=0.10.2,<0.11"]
    elif shutil.which("nvidia-smi"):
        extra = ["jax[cuda12]>=0.10.2,<0.11"]
    else:
        extra = []
    pip = [sys.executable, "-m", "pip", "install", "-q", f"llm_jax @ git+{LLM_JAX_REPO}"]
    subprocess.run(pip + extra, check=True)

# %%
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import Markdown, display

import llm_jax as lj
from llm_jax import notebook as nb
from llm_jax.train.config import config_from_dict
from llm_jax.train.loop import train

nb.show_devices()
RUNS = Path("runs/compression")
RUNS.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The model to compress
#
# The data: tiny-Shakespeare when it is found (`../shared/data`, or the excerpt committed
# with the tests), else the Python standard library's source as text. The last 10% of the
# characters are held out: every perplexity below is measured on them and nothing trains
# on them. Characters are the tokens, so perplexities are per character.

# %%
source = nb.find_data("tinyshakespeare.txt", "shakespeare.txt")
if source is not None:
    text = source.read_text(encoding="utf-8")
else:
    from llm_jax.train.data import stdlib_corpus

    text = "\n".join(p.read_text(errors="replace") for p in stdlib_corpus()[:40])
text = text[: nb.pick(smoke=200_000, full=len(text))]
split = int(0.9 * len(text))
(RUNS / "train.txt").write_text(text[:split], encoding="utf-8")
held_out_text = text[split:]
print(f"{source or 'stdlib source'}: {len(text):,} characters, {len(held_out_text):,} held out")

SEQ = nb.pick(smoke=64, full=256)
WIDTH, LAYERS = nb.pick(smoke=(64, 4), full=(256, 6))


def run_config(name, steps, num_layers=LAYERS, **train_extra):
    """The teacher's run config (char tokenizer, GPT-2-style model); students share its
    tokenizer and data and change only the depth and the `train` section."""
    data = {
        "paths": [str(RUNS / "train.txt")],
        "tokenizer_type": "char",
        "vocab_size": None,
        "num_sentinels": 0,
        "byte_fallback": False,
        "add_bos": False,
        "add_eos": False,
        "seq_len": SEQ,
        "batch_size": nb.pick(smoke=16, full=32),
        "validation_fraction": 0.05,
    }
    if name != "teacher":
        data["tokenizer_path"] = str(RUNS / "teacher" / "tokenizer")
    return config_from_dict(
        {
            "name": name,
            "workdir": str(RUNS / name),
            "model": {
                "preset": "gpt2-tiny",
                "d_model": WIDTH,
                "num_layers": num_layers,
                "num_heads": 4,
                "d_ff": 4 * WIDTH,
                "max_position_embeddings": SEQ,
                "scan_layers": True,  # one compiled layer body, whatever the depth
            },
            "data": data,
            "train": {
                "steps": steps,
                "log_every": 10,
                "eval_every": 0,
                "checkpoint_every": steps,
                "progress": False,
                **train_extra,
            },
            "optimizer": {"learning_rate": 3e-3, "warmup_steps": 10, "weight_decay": 0.1},
        }
    )


TEACHER_STEPS = nb.pick(smoke=60, full=1500)
plot = nb.LiveLossPlot(every=20, title="teacher")
train(run_config("teacher", TEACHER_STEPS), callbacks=[plot])
restored = lj.convert.restore_model(RUNS / "teacher")
model, tokenizer = restored.model, lj.convert.load_hf_tokenizer(restored.tokenizer_dir)
print(f"{lj.models.count_params(model):,} parameters")

# %% [markdown]
# Held-out perplexity, $\exp\big(-\frac{1}{N}\sum_t \log p_\theta(x_t \mid x_{<t})\big)$,
# over non-overlapping windows of the held-out characters. The jitted function takes the
# model as an argument, so every model of the same structure (each pruned copy) reuses
# one compilation.

# %%
held_ids = np.asarray(tokenizer.encode(held_out_text), np.int32)
n_rows = nb.pick(smoke=16, full=256)
rows = held_ids[: n_rows * SEQ].reshape(-1, SEQ)


@nnx.jit
def total_nll(m, rows):  # [R, T] -> summed negative log-likelihood of tokens 1..T-1
    logp = jax.nn.log_softmax(m(rows[:, :-1]).astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, rows[:, 1:, None], axis=-1))


def perplexity(m) -> float:
    return math.exp(float(total_nll(m, jnp.asarray(rows))) / (rows.shape[0] * (SEQ - 1)))


base_ppl = perplexity(model)
print(f"teacher: held-out perplexity {base_ppl:.3f} per character over {rows.size:,} tokens")

# %% [markdown]
# ## Quantization: int8 and int4
#
# Weight-only quantization stores each kernel $W \in \mathbb{R}^{I \times O}$ as integers
# $q$ and a scale per group of $g$ inputs and output column:
# $$ s_{go} = \frac{\max_{i \in g} |W_{io}|}{q_{\max}}, \qquad
#    q_{io} = \operatorname{round}\!\left(\frac{W_{io}}{s_{go}}\right)
#    \in [-q_{\max}, q_{\max}], \qquad
#    \hat W_{io} = s_{go}\, q_{io}, $$
# with $q_{\max} = 127$ for int8 (one group: a scale per output channel) and $7$ for int4
# (two values packed per byte, groups of $g$ inputs). Activations stay in floating point:
# each kernel is dequantized right before its product. The rounding error per weight is
# at most $s/2$, which is why int4 needs small groups. `lj.compress.quantize(model, bits)`
# returns an ordinary model of the same config (with `quant_bits` set) that `generate`,
# evaluation and checkpoints take unchanged.

# %%
group = math.gcd(128, model.cfg.d_model, model.cfg.d_ff)
models = {
    "fp32": model,
    "int8": lj.compress.quantize(model, bits=8),
    f"int4 (g{group})": lj.compress.quantize(model, bits=4, group_size=group),
}
prompt = tokenizer.encode("ROMEO:\n")
NEW = nb.pick(smoke=32, full=128)


def decode_tokens_per_s(m, repeats=3) -> float:
    """Greedy batch-1 tokens/s: best of `repeats` timed calls after a compiling one."""
    run = lambda: jax.block_until_ready(lj.sample.generate(m, [prompt], max_new_tokens=NEW).tokens)  # noqa: E731
    run()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return NEW / best


quant_rows = []
for name, m in models.items():
    ppl = perplexity(m)
    quant_rows.append(
        {
            "model": name,
            "weights (KB)": lj.compress.weight_bytes(m) / 1e3,
            "held-out ppl": ppl,
            "ppl change": f"{100 * (ppl / base_ppl - 1):+.2f}%",
            "decode tok/s": decode_tokens_per_s(m),
        }
    )
fp32_speed = quant_rows[0]["decode tok/s"]
for r in quant_rows:
    r["speed vs fp32"] = r["decode tok/s"] / fp32_speed
display(Markdown(nb.table(quant_rows)))
out = lj.sample.generate(models["int8"], [prompt], max_new_tokens=NEW)
print("int8 greedy:", repr(tokenizer.decode(np.asarray(out.tokens)[0].tolist())))

# %% [markdown]
# What the table says, honestly. The weights shrink about 3.5x (int8) and 6x (int4: half a
# byte a weight plus a scale per group); norms, biases and the position table stay in
# float32, so the larger the model the closer the ratios get to 4x and 8x. Perplexity
# barely moves for int8 and a little for int4.
# Speed: XLA:CPU has no mixed-precision matrix product, so left to itself it would
# dequantize every kernel to a float32 copy on every decode step. On CPU the quantized
# layers of a decode step (up to 32 rows) therefore run llm_jax's own kernel
# (`llm_jax/kernels/qmatmul.cc`, compiled at first use and called through the XLA FFI),
# which reads the int8 / packed int4 bytes directly; the ratio in the table is what this
# run measured. On a model this small the weights sit in the CPU's caches and per-call
# overheads dominate, so expect no gain here: weight-only quantization pays off where
# decoding is bound by memory bandwidth (batch-1 decoding of a model of hundreds of
# millions of parameters reads every weight once per token, and reading a quarter of the
# bytes is what sets the speed; `benchmarks/decode.py` measures that on gpt2-small) and
# wherever the model must fit in less memory (a 16 GB v5e holds a 4x larger int8 model).

# %% [markdown]
# ## Pruning
#
# **Unstructured magnitude pruning** zeroes the fraction $s$ of weights with the smallest
# $|w|$: the mask is $m_{ij} = \mathbb{1}[\,|w_{ij}| \ge \tau_s\,]$ where $\tau_s$ is the
# $s$-quantile of the magnitudes, over all weight matrices at once (`global`) or per matrix
# (`layer`). Only weight matrices prune, never norms or biases. One-shot pruning of the
# trained model is shown here; during training, the `prune:` config section prunes
# gradually along Zhu & Gupta's cubic schedule
# $s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{n\Delta t}\right)^3$
# (e.g. `llm-jax train configs/tiny.yaml prune.sparsity=0.8 prune.end_step=250`), which
# lets the rest of the network recover.

# %%
from llm_jax.compress import prune_params, sparsity_of
from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.parallel.mesh import logical_axes

axes, params = logical_axes(model), jax.device_get(params_of(model))
sparsities = nb.pick(
    smoke=(0.0, 0.5, 0.8, 0.9), full=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
)
curve = {}
for scope in ("global", "layer"):
    for s in sparsities:
        pruned = prune_params(params, axes, s, scope)
        curve.setdefault(scope, []).append(
            (sparsity_of(pruned, axes), perplexity(model_from_params(model.cfg, pruned)))
        )
print(nb.table([{"scope": k, "sparsity": s, "ppl": p} for k, v in curve.items() for s, p in v]))

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(6, 3.8))
for scope, pts in curve.items():
    ax.plot(*zip(*pts, strict=True), "o-", label=f"one-shot, {scope} threshold")
ax.axhline(base_ppl, color="gray", lw=0.8, ls="--", label="dense")
ax.set(
    xlabel="sparsity of the weight matrices",
    ylabel="held-out perplexity",
    yscale="log",
    title="magnitude pruning of the trained model",
)
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Zeros alone save nothing in a dense kernel. **Structured pruning** removes whole units:
# each attention head and each MLP neuron gets an importance, the sum over the weights it
# owns of $w^2$ (`norm_saliency`) or of $|w \cdot \partial L / \partial w|$
# (`gradient_saliency`, the first-order Taylor estimate of the loss change when the unit
# is removed); per layer the most important `heads` heads and `ffn` neurons stay, and the
# result is an ordinary, smaller model config.

# %%
from llm_jax.compress import norm_saliency, prune_structure

heads, ffn = model.cfg.num_heads // 2, model.cfg.d_ff // 2
small_cfg, small_params = prune_structure(
    model.cfg, params, heads=heads, ffn=ffn, saliency=norm_saliency(params)
)
small = model_from_params(small_cfg, small_params)
display(
    Markdown(
        nb.table(
            [
                {
                    "model": "dense",
                    "heads": model.cfg.num_heads,
                    "d_ff": model.cfg.d_ff,
                    "parameters": lj.models.count_params(model),
                    "held-out ppl": base_ppl,
                },
                {
                    "model": "structured (norm)",
                    "heads": heads,
                    "d_ff": ffn,
                    "parameters": lj.models.count_params(small),
                    "held-out ppl": perplexity(small),
                },
            ]
        )
    )
)

# %% [markdown]
# A few hundred steps of fine-tuning recover most of the loss (`llm-jax prune --heads ...
# --out DIR` then `init.from_checkpoint=DIR`; `benchmarks/prune.py` measures it).

# %% [markdown]
# ## Distillation
#
# A student $q_\phi$ with half the teacher's layers learns from the teacher's softened
# distribution as well as from the data (Hinton et al. 2015):
# $$ \mathcal{L} = \alpha\, T^2\,
#    \mathrm{KL}\!\left(p_\theta^{(T)} \,\middle\|\, q_\phi^{(T)}\right)
#    + (1 - \alpha)\, \mathrm{CE}(y, q_\phi), \qquad
#    p^{(T)} = \operatorname{softmax}(z / T), $$
# the $T^2$ keeping the soft term's gradient on the scale of the hard one. In a run config
# this is `train.teacher: DIR` with `train.distill_alpha` and `train.distill_temperature`
# (the frozen teacher runs inside the same jitted train step), e.g.
# `llm-jax train configs/tiny.yaml model.num_layers=2 train.teacher=runs/tiny
# data.tokenizer_path=runs/tiny/tokenizer`; `python benchmarks/distill.py` runs exactly
# that comparison. Here the loss is written out in a few lines around the library's
# `lj.compress.distill_kl`, so that both students share one compiled step: $\alpha = 0$ is
# the student trained from scratch, $\alpha = 0.5$ the distilled one, same initialisation,
# same batches, same steps.

# %%
import optax

STUDENT_STEPS, TEMPERATURE = nb.pick(smoke=40, full=600), 2.0
half = max(LAYERS // 2, 1)
student_cfg = model.cfg.replace(num_layers=half)
train_ids = np.asarray(tokenizer.encode(text[:split]), np.int32)
graphdef, init_params = nnx.split(lj.models.build(student_cfg, rngs=nnx.Rngs(params=1)))
teacher_graphdef, teacher_params = nnx.split(model)
schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, STUDENT_STEPS)
tx = optax.adamw(schedule, weight_decay=0.1)


@jax.jit
def distill_step(params, opt_state, tokens, alpha):
    """One AdamW step on alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE; tokens [B, T+1]."""
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    weights = jnp.ones(labels.shape, jnp.float32)
    teacher_logits = nnx.merge(teacher_graphdef, teacher_params)(inputs)  # frozen: no grad

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(inputs)
        kl, n = lj.compress.distill_kl(logits, teacher_logits, weights, TEMPERATURE)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return alpha * TEMPERATURE**2 * kl / n + (1 - alpha) * jnp.mean(ce)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


students = {}
for name, alpha in (("student from scratch", 0.0), ("distilled student", 0.5)):
    params, opt_state = init_params, tx.init(init_params)  # the same start for both
    rng = np.random.default_rng(0)  # and the same batches
    for _ in range(STUDENT_STEPS):
        starts = rng.integers(0, len(train_ids) - SEQ - 1, nb.pick(smoke=16, full=32))
        tokens = jnp.asarray(np.stack([train_ids[i : i + SEQ + 1] for i in starts]))
        params, opt_state, loss = distill_step(params, opt_state, tokens, jnp.float32(alpha))
    students[name] = nnx.merge(graphdef, params)

distill_rows = [
    {
        "model": f"teacher ({LAYERS} layers)",
        "parameters": lj.models.count_params(model),
        "held-out ppl": base_ppl,
    }
] + [
    {
        "model": f"{name} ({half} layers, {STUDENT_STEPS} steps)",
        "parameters": lj.models.count_params(s),
        "held-out ppl": perplexity(s),
    }
    for name, s in students.items()
]
display(Markdown(nb.table(distill_rows)))

# %% [markdown]
# The distilled student sees, at every position, the teacher's whole distribution over the
# next character instead of the one character that happened to follow: a richer signal
# per step, which pays off when the teacher is good and the student's budget is what
# limits it (`python benchmarks/distill.py` measures it on the tiny config, with
# `train.teacher`). In smoke mode both are far too short to read anything into the gap:
# the teacher itself is barely trained, and half of the distilled student's loss goes to
# imitating it, so it can come out behind the scratch student.
