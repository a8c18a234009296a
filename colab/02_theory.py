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
# # 02 · Theory: the field's equations, each next to its function and a NumPy check
#
# Every section states an equation, names the `llm_jax` function that implements it
# (`path::name`, the same names as in `docs/theory_to_practice.md`), runs it, and checks it
# against a float64 NumPy computation written in the cell (`np.testing.assert_allclose`,
# rtol 1e-5 for float32 ops). The pictures come from a small character-level GPT trained on
# Shakespeare in the notebook itself, so the attention maps and the sentence scores are
# those of a real (if small) language model.
#
# Expected run time (estimates from the step counts, not measurements): full size about
# 2 minutes on a Colab TPU v5e or a T4/L4 GPU (the 800 training steps of a 0.8M-parameter
# model dominate), about 10 minutes on a CPU runtime; smoke mode (`LLM_JAX_SMOKE=1`, what
# CI runs) well under a minute on a CPU.

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
from llm_jax import notebook as nb

nb.show_devices()

# %%
import math
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import llm_jax as lj
from llm_jax import ops

# TPUs (and TF32 GPUs) multiply float32 matrices in reduced-precision passes by default;
# the checks below compare with float64 at rtol 1e-5, so ask for full float32 products.
jax.config.update("jax_default_matmul_precision", "highest")
t_start = time.perf_counter()
rng = np.random.default_rng(0)

# %% [markdown]
# ## A small model to look at
#
# Data: tiny Shakespeare (`nb.find_data`), or a short text this cell writes when no copy is
# around. Tokens are characters (`llm_jax/data/tokenizer.py::CharTokenizer`), with 16 T5
# sentinels for the span-corruption section. The model is `lj.models.GPT` (GPT-2 shape:
# learned positions, pre-LayerNorm) trained by maximum likelihood: the loss is
# `llm_jax/ops/losses.py::cross_entropy`, exactly the quantity of the next three sections.
# `lj.train.train` does the same at scale (see `01_quickstart`); here the loop is spelled
# out in a dozen lines.

# %%
path = nb.find_data("tinyshakespeare.txt", "shakespeare.txt")
if path is not None:
    text = path.read_text(encoding="utf-8")
else:
    text = (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die "
        "than to famish?\n\nAll:\nResolved. resolved.\n\n"
    ) * 200
text = text[: nb.pick(smoke=200_000, full=len(text))]
tok = lj.data.CharTokenizer(sorted(set(text)), byte_fallback=False, num_sentinels=16)
data = np.asarray(tok.encode(text), np.int32)
print(f"{path or 'notebook text'}: {len(text):,} characters, vocabulary {tok.vocab_size}")

cfg = lj.ModelConfig.from_dict(
    {
        "preset": "gpt2-tiny",
        "vocab_size": tok.vocab_size,
        "d_model": nb.pick(smoke=64, full=128),
        "num_layers": nb.pick(smoke=2, full=4),
        "num_heads": 4,
        "d_ff": nb.pick(smoke=256, full=512),
        "max_position_embeddings": 128,
    }
)
model = lj.models.GPT(cfg, rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model)
print(f"GPT: {lj.models.count_params(model):,} parameters")

T_TRAIN, B_TRAIN = nb.pick(smoke=64, full=128), nb.pick(smoke=8, full=32)
STEPS = nb.pick(smoke=60, full=800)
optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, STEPS), b2=0.99)
opt_state = optimizer.init(params)


def lm_loss(params, tokens):
    """Mean next-token cross-entropy of tokens [B, T + 1] (nats per token)."""
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    total, count = ops.cross_entropy(logits, tokens[:, 1:])
    return total / count


@jax.jit
def train_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lm_loss)(params, tokens)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


losses = []
for _ in range(STEPS):
    starts = rng.integers(0, len(data) - T_TRAIN - 1, size=B_TRAIN)
    batch = np.stack([data[s : s + T_TRAIN + 1] for s in starts])
    params, opt_state, loss = train_step(params, opt_state, batch)
    losses.append(float(loss))
model = nnx.merge(graphdef, params)


@jax.jit
def _forward(params, ids):
    hidden, _ = nnx.merge(graphdef, params).features(ids)
    return nnx.merge(graphdef, params).logits(hidden), hidden


def lm_forward(rows):
    """Logits and final hidden states of a few token rows (<= 8 rows of <= 64 tokens).

    Rows are right-padded to one [8, 64] shape so that every call below reuses one
    compiled program; the model is causal, so padding after a token never changes it.
    """
    ids = np.zeros((8, 64), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    logits, hidden = _forward(params, ids)
    return [(logits[i, : len(row)], hidden[i, : len(row)]) for i, row in enumerate(rows)]


print(
    f"loss after {STEPS} steps: {np.mean(losses[-10:]):.3f} nats/char "
    f"(uniform guessing: {math.log(tok.vocab_size):.3f})"
)

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(losses, lw=1)
ax.axhline(math.log(tok.vocab_size), ls="--", c="gray", label="log V (uniform)")
ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="maximum-likelihood training")
ax.legend()
plt.show()

# %% [markdown]
# ## The probability of a sentence
#
# A language model factors the probability of a sequence by the chain rule,
#
# $$\log p(x_1,\dots,x_T) = \sum_{t=1}^{T} \log p(x_t \mid x_{<t}),\qquad
# p(\cdot \mid x_{<t}) = \mathrm{softmax}(z_t),$$
#
# where $z_t$ are the logits the model computes from the prefix $x_{<t}$ alone (the causal
# mask of `llm_jax/models/gpt.py::GPT` guarantees it). Without a begin-of-sequence token the
# first character is given, so below we score $\log p(x_{2..T}\mid x_1)$. The sum of
# log-probabilities is minus the summed cross-entropy, the sum that
# `llm_jax/ops/losses.py::cross_entropy` returns, and `llm_jax/ops/softmax.py::log_softmax`
# gives the per-token terms. A real line should score far higher than the same letters
# shuffled.
# The check recomputes the chain rule in float64 NumPy from the model's logits.


# %%
def sentence_log_probs(logits, ids):
    """Per-token log p(x_t | x_<t) for t = 2..T and their sum, from the logits [T, V]."""
    logits, ids = logits[:-1], jnp.asarray(ids)
    logp = ops.log_softmax(logits)  # [T-1, V]
    per_token = jnp.take_along_axis(logp, ids[1:, None], axis=-1)[:, 0]
    total, _ = ops.cross_entropy(logits, ids[1:])
    return np.asarray(per_token), float(-total)


sentence = "To be, or not to be, that is the question."
shuffled = "".join(rng.permutation(list(sentence)))
ids, ids_s = tok.encode(sentence), tok.encode(shuffled)
(z, _), (z_s, _) = lm_forward([ids, ids_s])
per_tok, log_p = sentence_log_probs(z, ids)
per_tok_s, log_p_s = sentence_log_probs(z_s, ids_s)
z = np.asarray(z[:-1], np.float64)

# NumPy twin: log-softmax in float64 with the max subtracted, then the chain-rule sum.
z_np = z - z.max(-1, keepdims=True)
logp_np = z_np - np.log(np.exp(z_np).sum(-1, keepdims=True))
chain_np = logp_np[np.arange(len(ids) - 1), np.asarray(ids[1:])]
np.testing.assert_allclose(per_tok, chain_np, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(log_p, chain_np.sum(), rtol=1e-5)
print(
    nb.table(
        [
            {
                "text": repr(sentence),
                "log p (nats)": log_p,
                "bits/char": -log_p / math.log(2) / len(per_tok),
            },
            {
                "text": repr(shuffled),
                "log p (nats)": log_p_s,
                "bits/char": -log_p_s / math.log(2) / len(per_tok_s),
            },
        ]
    )
)
assert log_p > log_p_s, "the model should prefer the real line to its letters shuffled"

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(9, 3))
ax.bar(range(len(per_tok)), -per_tok / math.log(2), label="Hamlet", alpha=0.8)
ax.bar(range(len(per_tok_s)), -per_tok_s / math.log(2), label="same letters shuffled", alpha=0.5)
ax.set_xticks(range(len(per_tok)), list(sentence[1:]))
ax.set(ylabel="surprisal (bits)", title="-log2 p(x_t | x_<t); x labels: the Hamlet line")
ax.legend()
plt.show()

# %% [markdown]
# ## Softmax and numerical stability
#
# $$\mathrm{softmax}(z)_v = \frac{e^{z_v}}{\sum_u e^{z_u}} = \frac{e^{z_v - m}}{\sum_u e^{z_u - m}},
# \qquad m = \max_u z_u .$$
#
# Subtracting the maximum changes nothing mathematically but keeps every exponent $\le 0$,
# so $e^{z-m}\in(0,1]$ never overflows and the largest term is exactly 1 (no underflow of
# the whole sum). `llm_jax/ops/softmax.py::softmax` (and `log_softmax`, `logsumexp`) do
# this in float32 whatever the input dtype. Without the shift, float32 $e^{z}$ overflows to
# `inf` for $z > 88.7$ and the ratio becomes `inf / inf = nan`.

# %%
z = np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -1001.0, -1002.0], [1.0, 2.0, 3.0]], np.float32)
with np.errstate(over="ignore", invalid="ignore"):
    naive = np.exp(z) / np.exp(z).sum(-1, keepdims=True)  # float32, no max subtraction
stable = np.asarray(ops.softmax(jnp.asarray(z)))

# NumPy twin in float64: the shift by the max, written out.
ref = np.exp(z.astype(np.float64) - z.max(-1, keepdims=True))
ref /= ref.sum(-1, keepdims=True)
np.testing.assert_allclose(stable, ref, rtol=1e-5)
np.testing.assert_allclose(
    np.asarray(ops.logsumexp(jnp.asarray(z))),
    z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)),
    rtol=1e-5,
)
print("naive exp(z) / sum exp(z) in float32:\n", naive)
print("llm_jax.ops.softmax:\n", stable)
assert np.isnan(naive[0]).all() and np.isnan(naive[1]).all(), "the naive softmax should fail"
assert np.isfinite(stable).all()

# %% [markdown]
# ## Cross-entropy, maximum likelihood and label smoothing
#
# Maximum likelihood of the data $\{(x, y)\}$ under $p_\theta(y\mid x) = \mathrm{softmax}(z)_y$
# is minimising the average negative log-likelihood, the cross-entropy between the one-hot
# target and the model:
#
# $$\mathcal{L}_{\mathrm{CE}} = -\log p_y = \log\sum_v e^{z_v} - z_y .$$
#
# Label smoothing (Szegedy et al. 2016) mixes the target with the uniform distribution,
# $q = (1-\varepsilon)\,\mathrm{onehot}(y) + \varepsilon/V$:
#
# $$\mathcal{L}_\varepsilon = -(1-\varepsilon)\log p_y - \frac{\varepsilon}{V}\sum_v \log p_v .$$
#
# Implemented by `llm_jax/ops/losses.py::cross_entropy` (`label_smoothing=`, PyTorch's
# convention), which returns (sum, count) so that means reduce correctly across batches and
# devices. With $\varepsilon>0$ the loss is no longer minimised by an infinite logit: the
# optimum is $p_y = 1-\varepsilon+\varepsilon/V$, the curves below bottom out there.

# %%
V = 8
logits = rng.normal(size=(4, 5, V)).astype(np.float32) * 3
labels = rng.integers(0, V, size=(4, 5))
weights = (rng.random((4, 5)) > 0.2).astype(np.float32)
for eps in (0.0, 0.1):
    total, count = ops.cross_entropy(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(weights), label_smoothing=eps
    )
    # NumPy twin: -sum_v q_v log p_v with the smoothed target q, weighted.
    x = logits.astype(np.float64)
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    q = np.full(x.shape, eps / V)
    np.put_along_axis(q, labels[..., None], 1 - eps + eps / V, axis=-1)
    nll = -(q * logp).sum(-1)
    np.testing.assert_allclose(float(total), (nll * weights).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(count), weights.sum())
    mean_np = (nll * weights).sum() / weights.sum()
    print(f"eps={eps}: mean loss {float(total / count):.4f}  (NumPy {mean_np:.4f})")

# %% tags=["plot"]
# One position, V classes: the correct class has logit s, the others 0. Loss as a function of s.
s = np.linspace(-2, 12, 200)
curve_logits = np.zeros((len(s), V), np.float32)
curve_logits[:, 0] = s
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for eps in (0.0, 0.1, 0.3):
    per = jax.vmap(
        lambda row, eps=eps: ops.cross_entropy(
            row[None], jnp.zeros(1, jnp.int32), label_smoothing=eps
        )[0]
    )(jnp.asarray(curve_logits))
    p_y = np.exp(s) / (np.exp(s) + V - 1)
    axes[0].plot(s, per, label=f"ε={eps}")
    axes[1].plot(p_y, per, label=f"ε={eps}")
    if eps:
        axes[1].axvline(1 - eps + eps / V, ls=":", c="gray")
axes[0].set(
    xlabel="logit of the correct class s", ylabel="loss (nats)", title="cross-entropy vs logit"
)
axes[1].set(xlabel="p(correct)", ylabel="loss (nats)", title="minimum at p = 1 - ε + ε/V (dotted)")
axes[0].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Scaled dot-product attention
#
# $$\mathrm{Attention}(Q,K,V) = \mathrm{softmax}\!\Big(\frac{QK^\top}{\sqrt{d_k}} + M\Big)V,$$
#
# with $M_{ij} = 0$ where query $i$ may see key $j$ and $-\infty$ (in practice the most
# negative float) elsewhere. The $1/\sqrt{d_k}$ keeps the logits' variance near 1 for unit
# variance $q, k$, so the softmax is not saturated at initialisation.
# `llm_jax/ops/attention.py::dot_product_attention` is the equation, shape [B, T, N, H].
# The check uses random inputs and a causal mask; the picture is the attention of the
# trained GPT's first layer on a line of Shakespeare (query row, key column), computed by
# running the model's own layer-0 projections through the same softmax.

# %%
B, T, N, H = 2, 6, 3, 8
q = rng.normal(size=(B, T, N, H)).astype(np.float32)
k = rng.normal(size=(B, T, N, H)).astype(np.float32)
v = rng.normal(size=(B, T, N, H)).astype(np.float32)
out = ops.dot_product_attention(
    jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), mask=ops.causal_mask(T)
)

# NumPy twin: per batch and head, scores = q k^T / sqrt(H), masked to -inf above the diagonal.
qd, kd, vd = (a.astype(np.float64).transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, N, T, H]
scores = qd @ kd.transpose(0, 1, 3, 2) / math.sqrt(H)
scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
probs = np.exp(scores - scores.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)
np.testing.assert_allclose(
    np.asarray(out), (probs @ vd).transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-6
)
print("dot_product_attention matches the float64 NumPy twin")


# %%
def layer_blocks(model):
    """The GPT's Transformer blocks, one `nnx.Module` per layer (the stack stores them
    stacked on a leading layer axis; `nnx.split` / `merge` take one slice out)."""
    gdef, state = nnx.split(model.layers.blocks)
    return [
        nnx.merge(gdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(cfg.num_layers)
    ]


@jax.jit
def attention_maps(params, ids):
    """Per layer: the attention probabilities [N, T, T] of one row `ids` [T], and the
    final hidden states; the layers are run one by one with `ops` for the probabilities."""
    model, t = nnx.merge(graphdef, params), len(ids)
    x = model.embed(ids[None]) + model.pos_embed[...][:t][None]  # learned positions
    mask = ops.causal_mask(t)
    maps = []
    for block in layer_blocks(model):
        a = block.self_attn_norm(x)
        qh, kh = block.self_attn.q(a), block.self_attn.k(a)  # [1, T, N, H]
        logits = jnp.einsum("BTNH,BSNH->BNTS", qh, kh) / math.sqrt(qh.shape[-1])
        maps.append(ops.softmax(jnp.where(mask, logits, ops.big_neg(jnp.float32)))[0])
        x, _ = block(x, mask=mask, positions=jnp.arange(t)[None])
    return maps, model.final_norm(x)


line = "ROMEO:\nBut soft, what light through yonder window breaks?"[:48]
line_ids = jnp.asarray(tok.encode(line))
maps, hidden = attention_maps(params, line_ids)
# The layer-by-layer run is the model: its hidden states equal GPT.features'.
np.testing.assert_allclose(hidden[0], lm_forward([line_ids])[0][1], rtol=1e-5, atol=1e-5)
print(f"{len(maps)} layers x {maps[0].shape[0]} heads of attention over {len(line)} characters")

# %% tags=["plot"]
labels_txt = [c if c != "\n" else "⏎" for c in line]
fig, ax = plt.subplots(figsize=(7, 6.5))
im = ax.imshow(np.asarray(maps[-1]).mean(0), cmap="viridis")
ax.set_xticks(range(len(line)), labels_txt, fontsize=6)
ax.set_yticks(range(len(line)), labels_txt, fontsize=6)
ax.set(xlabel="key", ylabel="query", title=f"layer {cfg.num_layers - 1}, mean over heads")
fig.colorbar(im, shrink=0.7)
plt.show()

# %% [markdown]
# ## Multi-head attention
#
# $$\mathrm{MultiHead}(X) = \mathrm{Concat}(\mathrm{head}_1,\dots,\mathrm{head}_N)\,W^O,\qquad
# \mathrm{head}_n = \mathrm{Attention}(XW^Q_n, XW^K_{g(n)}, XW^V_{g(n)}),$$
#
# with $g(n) = n$ for multi-head attention and $g(n) = \lfloor n/(N/K)\rfloor$ when $K<N$
# key/value heads are shared (grouped-query; $K=1$ is multi-query).
# `llm_jax/ops/attention.py::dot_product_attention` takes N query heads and K key/value
# heads; the projections live in `llm_jax/models/layers.py::SelfAttention`. The check runs
# the trained model's layer-0 self-attention and recomputes it in float64 NumPy from its
# weights (the concat-then-$W^O$ is one einsum over heads), then a grouped-query call.

# %%
block0 = layer_blocks(model)[0]
x0 = model.embed(line_ids[None]) + model.pos_embed[...][: len(line)][None]
a0 = block0.self_attn_norm(x0)
attn_out, _ = block0.self_attn(
    a0, mask=ops.causal_mask(len(line)), positions=jnp.arange(len(line))[None]
)

sa = block0.self_attn
W = {n: np.asarray(getattr(sa, n).kernel[...], np.float64) for n in "qkvo"}
b_ = {n: np.asarray(getattr(sa, n).bias[...], np.float64) for n in "qkvo"}
A = np.asarray(a0[0], np.float64)  # [T, D]
heads = []
for n in range(cfg.num_heads):
    qn = A @ W["q"][:, n] + b_["q"][n]  # [T, H]
    kn = A @ W["k"][:, n] + b_["k"][n]
    vn = A @ W["v"][:, n] + b_["v"][n]
    s_ = qn @ kn.T / math.sqrt(qn.shape[-1])
    s_ = np.where(np.tril(np.ones_like(s_, bool)), s_, -np.inf)
    p_ = np.exp(s_ - s_.max(-1, keepdims=True))
    heads.append((p_ / p_.sum(-1, keepdims=True)) @ vn)
concat = np.concatenate(heads, axis=-1)  # [T, N*H]
mha_np = concat @ W["o"].reshape(-1, cfg.d_model) + b_["o"]
np.testing.assert_allclose(attn_out[0], mha_np, rtol=1e-5, atol=1e-5)

# Grouped-query attention: 4 query heads share 2 key/value heads.
qg = rng.normal(size=(1, 5, 4, 8)).astype(np.float32)
kg, vg = (rng.normal(size=(1, 5, 2, 8)).astype(np.float32) for _ in range(2))
gqa = ops.dot_product_attention(jnp.asarray(qg), jnp.asarray(kg), jnp.asarray(vg))
for n in range(4):
    g = n // 2
    s_ = qg[0, :, n].astype(np.float64) @ kg[0, :, g].T.astype(np.float64) / math.sqrt(8)
    p_ = np.exp(s_ - s_.max(-1, keepdims=True))
    np.testing.assert_allclose(
        gqa[0, :, n], (p_ / p_.sum(-1, keepdims=True)) @ vg[0, :, g], rtol=1e-5, atol=1e-6
    )
print("multi-head and grouped-query attention match their NumPy twins")

# %% tags=["plot"]
fig, axes = plt.subplots(
    cfg.num_layers, cfg.num_heads, figsize=(2.4 * cfg.num_heads, 2.4 * cfg.num_layers)
)
for layer, m in enumerate(maps):
    for head in range(cfg.num_heads):
        ax = axes[layer, head]
        ax.imshow(np.asarray(m[head]), cmap="viridis")
        ax.set(xticks=[], yticks=[], title=f"layer {layer} head {head}")
fig.suptitle(f"every head on {line[:24]!r}...")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Masks: causal, padding, segment
#
# A mask is a boolean matrix $A\in\{0,1\}^{T\times S}$, True where query $i$ may attend to key
# $j$; masked logits are set to the most negative float before the softmax.
#
# - causal (decoders): $A_{ij} = [\,j \le i\,]$ —
#   `llm_jax/ops/attention.py::causal_mask`
# - padding: $A_{ij} = \mathrm{valid}_i \wedge \mathrm{valid}_j$ —
#   `llm_jax/ops/attention.py::padding_mask`
# - segment (packed documents): $A_{ij} = [\,s_i = s_j \ne 0\,]$ —
#   `llm_jax/ops/attention.py::segment_mask`
#
# and they combine by logical AND (`llm_jax/ops/attention.py::combine_masks`): a packed
# decoder row uses causal ∧ segment.

# %%
T = 10
valid = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]], bool)
segments = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 0]], np.int32)
causal = np.asarray(ops.causal_mask(T))[0, 0]
padding = np.asarray(ops.padding_mask(jnp.asarray(valid)))[0, 0]
segment = np.asarray(ops.segment_mask(jnp.asarray(segments)))[0, 0]
packed = np.asarray(ops.combine_masks(ops.causal_mask(T), ops.segment_mask(jnp.asarray(segments))))[
    0, 0
]

# NumPy twins, entry by entry.
i, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
np.testing.assert_array_equal(causal, j <= i)
np.testing.assert_array_equal(padding, valid[0][i] & valid[0][j])
np.testing.assert_array_equal(segment, (segments[0][i] == segments[0][j]) & (segments[0][i] != 0))
np.testing.assert_array_equal(packed, (j <= i) & segment)
print("causal, padding, segment and combined masks match")

# %% tags=["plot"]
fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
for ax, (name, m) in zip(
    axes,
    [
        ("causal", causal),
        ("padding (3 pads)", padding),
        ("segment ids 1112223330", segment),
        ("causal ∧ segment (packed GPT)", packed),
    ],
    strict=True,
):
    ax.imshow(m, cmap="Greys", vmin=0, vmax=1)
    ax.set(title=name, xlabel="key j", ylabel="query i", xticks=range(T), yticks=range(T))
fig.suptitle("black: query i may attend to key j")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Sinusoidal positions
#
# The Transformer's fixed position table (Vaswani et al. 2017, §3.5):
#
# $$PE_{p,2i} = \sin\!\big(p/10000^{2i/D}\big),\qquad
# PE_{p,2i+1} = \cos\!\big(p/10000^{2i/D}\big).$$
#
# Each pair of dimensions is a clock at its own frequency, from one turn per $2\pi$ positions
# down to one per $2\pi\cdot 10^4$. For each frequency, $PE_{p+k}$ is a rotation of $PE_p$
# by an angle that depends only on $k$, so $\langle PE_p, PE_{p+k}\rangle$ depends only on
# the offset $k$. `llm_jax/ops/positions.py::sinusoidal_positions` (interleaved sin/cos as in
# the paper); the T5-family `transformer-base` preset uses it.

# %%
P, D = 128, 64
pe = np.asarray(ops.sinusoidal_positions(P, D))
pe_np = np.zeros((P, D))
for p in range(P):
    for i2 in range(0, D, 2):
        pe_np[p, i2] = math.sin(p / 10000 ** (i2 / D))
        pe_np[p, i2 + 1] = math.cos(p / 10000 ** (i2 / D))
np.testing.assert_allclose(pe, pe_np, rtol=1e-5, atol=2e-5)  # float32 angles up to 127 rad
# <PE_p, PE_p+k> depends only on k.
for k_off in (1, 5, 20):
    dots = (pe_np[:-k_off] * pe_np[k_off:]).sum(-1)
    np.testing.assert_allclose(dots, dots[0], rtol=1e-9)
print("sinusoidal table matches; <PE_p, PE_p+k> is constant in p for each k")

# %% tags=["plot"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
im = axes[0].imshow(pe.T, aspect="auto", cmap="RdBu")
axes[0].set(xlabel="position p", ylabel="dimension", title="PE[p, :] (sin/cos interleaved)")
fig.colorbar(im, ax=axes[0])
axes[1].plot(pe @ pe[0], label="<PE_0, PE_p>")
axes[1].plot(pe @ pe[64], label="<PE_64, PE_p>")
axes[1].set(xlabel="position p", title="similarity falls off with |offset|")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Rotary positions
#
# RoPE (Su et al. 2021) rotates each pair of query/key coordinates by an angle proportional
# to the position, $\theta_i = 10000^{-2i/H}$:
#
# $$\mathrm{RoPE}(x, p) = \begin{pmatrix} x^{(1)}\cos p\theta - x^{(2)}\sin p\theta \\
# x^{(2)}\cos p\theta + x^{(1)}\sin p\theta \end{pmatrix}$$
#
# with $x^{(1)}, x^{(2)}$ the two halves of the head dimension (the rotate-half convention of
# GPT-NeoX / LLaMA). Because rotations compose, $\langle R_m q, R_n k\rangle = \langle q,
# R_{n-m} k\rangle$: the attention logit depends on the positions only through $n-m$.
# `llm_jax/ops/positions.py::apply_rope` (frequencies from
# `llm_jax/ops/positions.py::rope_frequencies`); LLaMA-style configs (`position: rope`) use it.

# %%
Hd = 16
x = rng.normal(size=(1, 4, 2, Hd)).astype(np.float32)
pos = np.array([[0, 3, 17, 100]])
rot = np.asarray(ops.apply_rope(jnp.asarray(x), jnp.asarray(pos)))
theta = 10000.0 ** (-np.arange(0, Hd, 2) / Hd)
ang = pos[0][:, None, None] * theta  # [T, 1, H/2]
x1, x2 = x[0, ..., : Hd // 2].astype(np.float64), x[0, ..., Hd // 2 :].astype(np.float64)
rot_np = np.concatenate(
    [x1 * np.cos(ang) - x2 * np.sin(ang), x2 * np.cos(ang) + x1 * np.sin(ang)], -1
)
np.testing.assert_allclose(rot[0], rot_np, rtol=1e-5, atol=1e-5)

# Relative position: the same offset n - m gives the same logit wherever the pair sits.
qv = jnp.asarray(rng.normal(size=(1, 1, 1, Hd)).astype(np.float32))
kv = jnp.asarray(rng.normal(size=(1, 1, 1, Hd)).astype(np.float32))


def rope_logit(m, n):
    return float(
        jnp.sum(ops.apply_rope(qv, jnp.array([[m]])) * ops.apply_rope(kv, jnp.array([[n]])))
    )


for m, n in [(0, 7), (3, 10), (50, 57), (400, 407)]:
    np.testing.assert_allclose(rope_logit(m, n), rope_logit(0, 7), rtol=1e-4, atol=1e-4)
print("apply_rope matches; <R_m q, R_n k> depends only on n - m:", round(rope_logit(0, 7), 4))

# %% tags=["plot"]
offsets = np.arange(-64, 65)
same = jnp.asarray(np.ones((1, 1, 1, 64), np.float32))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
q_rot = ops.apply_rope(
    jnp.broadcast_to(same, (1, len(offsets), 1, 64)), jnp.full((1, len(offsets)), 100)
)
k_rot = ops.apply_rope(
    jnp.broadcast_to(same, (1, len(offsets), 1, 64)), jnp.asarray(100 + offsets)[None]
)
logit_by_offset = np.asarray(jnp.sum(q_rot * k_rot, axis=-1))[0, :, 0]
axes[0].plot(offsets, logit_by_offset)
axes[0].set(
    xlabel="offset n - m", ylabel="<R_m q, R_n q>", title="RoPE logit of q = k = 1 (H = 64)"
)
pts = np.asarray(
    ops.apply_rope(
        jnp.asarray(np.tile([[[[1.0, 0.0]]]], (1, 12, 1, 1)).astype(np.float32)),
        jnp.arange(12)[None],
        inv_freq=jnp.array([0.5]),  # one pair (H = 2) turning by θ = 0.5 rad per position
    )
)
axes[1].plot(pts[0, :, 0, 0], pts[0, :, 0, 1], "o-")
for p_i in range(12):
    axes[1].annotate(str(p_i), pts[0, p_i, 0])
axes[1].set(aspect="equal", title="(x1, x2) = (1, 0) rotated by p·θ, θ = 0.5")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## LayerNorm and RMSNorm
#
# $$\mathrm{LayerNorm}(x) = \frac{x-\mu}{\sqrt{\sigma^2+\epsilon}}\odot\gamma + \beta,\qquad
# \mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac1D\sum_d x_d^2+\epsilon}}\odot\gamma,$$
#
# with $\mu, \sigma^2$ the mean and variance over the feature dimension. RMSNorm (Zhang &
# Sennrich 2019; T5, LLaMA) drops the centring and the bias: cheaper, and in practice as
# good. Both are invariant to rescaling $x$; only LayerNorm is invariant to shifting it.
# `llm_jax/ops/norms.py::layer_norm`, `llm_jax/ops/norms.py::rms_norm`.

# %%
D = 32
xn = (rng.normal(size=(4, D)) * 3 + 2).astype(np.float32)
gamma = rng.normal(size=D).astype(np.float32)
beta = rng.normal(size=D).astype(np.float32)
ln = np.asarray(ops.layer_norm(jnp.asarray(xn), jnp.asarray(gamma), jnp.asarray(beta), eps=1e-5))
rms = np.asarray(ops.rms_norm(jnp.asarray(xn), jnp.asarray(gamma), eps=1e-6))
xd = xn.astype(np.float64)
mu, var = xd.mean(-1, keepdims=True), xd.var(-1, keepdims=True)
np.testing.assert_allclose(ln, (xd - mu) / np.sqrt(var + 1e-5) * gamma + beta, rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(
    rms, xd / np.sqrt((xd**2).mean(-1, keepdims=True) + 1e-6) * gamma, rtol=1e-5, atol=1e-5
)

shift = jnp.asarray(xn + 5.0)
rows = []
for name, fn in [
    ("layer_norm", lambda a: ops.layer_norm(a, None)),
    ("rms_norm", lambda a: ops.rms_norm(a, None)),
]:
    y = np.asarray(fn(jnp.asarray(xn)))
    rows.append(
        {
            "norm": name,
            "mean of output": float(np.abs(y.mean(-1)).max()),
            "rms of output": float(np.sqrt((y**2).mean(-1)).mean()),
            "max change when x -> 10x": float(
                np.abs(np.asarray(fn(jnp.asarray(10 * xn))) - y).max()
            ),
            "max change when x -> x + 5": float(np.abs(np.asarray(fn(shift)) - y).max()),
        }
    )
print(nb.table(rows))

# %% [markdown]
# ## Residual connections
#
# A residual block computes $x_{l+1} = x_l + f_l(x_l)$, so the gradient that reaches layer
# $l$ from the top is
#
# $$\frac{\partial \mathcal{L}}{\partial x_l} =
# \Big[\prod_{k=l}^{L-1}\Big(I + \frac{\partial f_k}{\partial x_k}\Big)\Big]^{\!\top}
# \frac{\partial \mathcal{L}}{\partial x_L},$$
#
# a product that contains the identity path: it cannot vanish the way the plain product
# $\prod_k \partial f_k/\partial x_k$ of a stack $x_{l+1} = f_l(x_l)$ does when each factor
# shrinks vectors (He et al. 2016). The experiment backpropagates a fixed unit gradient
# $\partial\mathcal{L}/\partial x_L$ (the loss is $\langle x_L, r\rangle$, $\|r\|=1$) through
# 24 random MLP blocks $f(x) = W_2\,\mathrm{gelu}(W_1 x)$ built from
# `llm_jax/ops/activations.py::gelu`, with and without the residual, and through the
# pre-LayerNorm residual block the models use, $x + f(\mathrm{LN}(x))$
# (`llm_jax/models/layers.py::Block`, `llm_jax/ops/norms.py::layer_norm`). One backward pass
# gives every depth at once: the gradient with respect to a zero added at each layer.

# %%
DEPTH, D = 24, 64
k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
W1 = jax.random.normal(k1, (DEPTH, D, 4 * D)) / math.sqrt(D)  # one MLP per layer
W2 = jax.random.normal(k2, (DEPTH, 4 * D, D)) / math.sqrt(4 * D)
x_in = jax.random.normal(k3, (8, D))
r = jax.random.normal(k4, (8, D))
r = r / jnp.linalg.norm(r)


def depth_grad_norms(block):
    """||dL/dx_l|| for l = 0..DEPTH-1 with L = <x_L, r>, for x_(l+1) = block(x_l, w1, w2)."""

    def loss(zeros):  # [DEPTH, 8, D]: dL/dzeros[l] = dL/dx_l
        def layer(h, xs):
            zero, w1, w2 = xs
            return block(h + zero, w1, w2), None

        h, _ = jax.lax.scan(layer, x_in, (zeros, W1, W2))
        return jnp.sum(h * r)

    g = jax.grad(loss)(jnp.zeros((DEPTH, *x_in.shape)))
    return jnp.linalg.norm(g.reshape(DEPTH, -1), axis=-1)


mlp = lambda h, w1, w2: ops.gelu(h @ w1) @ w2  # noqa: E731
plain, residual, pre_ln = np.asarray(
    jax.jit(
        lambda: jnp.stack(
            [
                depth_grad_norms(mlp),
                depth_grad_norms(lambda h, w1, w2: h + mlp(h, w1, w2)),
                depth_grad_norms(lambda h, w1, w2: h + mlp(ops.layer_norm(h, None), w1, w2)),
            ]
        )
    )()
)
print(
    nb.table(
        [
            {"stack": "f(x)  (no residual)", "||dL/dx_0||": float(plain[0])},
            {"stack": "x + f(x)  (residual)", "||dL/dx_0||": float(residual[0])},
            {"stack": "x + f(LN(x))  (pre-LN residual)", "||dL/dx_0||": float(pre_ln[0])},
        ]
    )
)
assert plain[0] < 1e-4 and residual[0] > 0.5 and pre_ln[0] > 0.5

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.semilogy(residual, "o-", ms=3, label="x + f(x)  (residual)")
ax.semilogy(pre_ln, "^-", ms=3, label="x + f(LN(x))  (pre-LN, as in GPT)")
ax.semilogy(plain, "s-", ms=3, label="f(x)  (no residual)")
ax.set(
    xlabel="layer l",
    ylabel="||dL/dx_l||",
    title=f"a unit gradient backpropagated through {DEPTH} layers",
)
ax.legend()
plt.show()

# %% [markdown]
# ## Encoder, decoder, encoder-decoder
#
# The three model families of `llm_jax` differ in which mask each attention uses:
#
# | family | model | self-attention | cross-attention |
# |---|---|---|---|
# | encoder (BERT) | `llm_jax/models/bert.py::BERT` | bidirectional ∧ segment | — |
# | decoder (GPT, LLaMA) | `llm_jax/models/gpt.py::GPT` | causal ∧ segment | — |
# | encoder–decoder (T5) | `llm_jax/models/t5.py::T5` | enc. bidirectional, dec. causal | cross |
#
# The masks come from `llm_jax/ops/attention.py::bidirectional_mask`, `causal_mask`,
# `segment_mask` and `cross_mask` (every real decoder token sees every real encoder token).
#
# The check is behavioural: change the last token and see which output positions move.
# In a decoder, no earlier position may change (it never saw the future); in an encoder
# every position changes; in T5 the decoder is causal, but every decoder position sees the
# whole encoder input.


# %%
def tiny(preset):
    mcfg = lj.ModelConfig.from_dict(
        {"preset": preset, "vocab_size": tok.vocab_size, "num_layers": 1}
    )
    return lj.models.build(mcfg, rngs=nnx.Rngs(1))


bert, t5 = tiny("bert-tiny"), tiny("t5-tiny")
ids_a = rng.integers(tok.vocab_size - 70, tok.vocab_size - 16, size=8)
ids_b = ids_a.copy()
ids_b[-1] = ids_a[-1] + 1  # only the last token differs
(gpt_a, _), (gpt_b, _) = lm_forward([ids_a, ids_b])  # the trained GPT
bert_out = nnx.jit(lambda m, x: m.encode(x))(bert, jnp.asarray(np.stack([ids_a, ids_b])))
t5_out = nnx.jit(lambda m, enc, dec: m(enc, dec))(
    t5, jnp.asarray(np.stack([ids_a, ids_a, ids_b])), jnp.asarray(np.stack([ids_a, ids_b, ids_a]))
)


def changed(a, b):
    moved = np.abs(np.asarray(a) - np.asarray(b)).max(-1) > 1e-6
    return "".join("x" if c else "." for c in moved)


rows = [
    {"model": "GPT (decoder)", "positions changed": changed(gpt_a, gpt_b)},
    {"model": "BERT (encoder)", "positions changed": changed(bert_out[0], bert_out[1])},
    {
        "model": "T5 decoder, last decoder token changed",
        "positions changed": changed(t5_out[0], t5_out[1]),
    },
    {
        "model": "T5 decoder, last encoder token changed",
        "positions changed": changed(t5_out[0], t5_out[2]),
    },
]
print(nb.table(rows))
assert [r["positions changed"] for r in rows] == [".......x", "xxxxxxxx", ".......x", "xxxxxxxx"]

# %% [markdown]
# ## MLM 80/10/10 and NSP
#
# BERT's masked LM selects 15% of the ordinary tokens for prediction; of those, 80% become
# `<mask>`, 10% a random token, 10% stay unchanged (so the model cannot rely on seeing
# `<mask>` where it must predict). The loss is the cross-entropy on selected positions only:
#
# $$\mathcal{L}_{\mathrm{MLM}} = -\sum_{t\in\mathcal{M}} \log p(x_t \mid \tilde x).$$
#
# `llm_jax/data/objectives/mlm.py::mlm_mask` draws it. Next-sentence prediction pairs
# `[CLS] A [SEP] B [SEP]` where B follows A (label 0) or comes from elsewhere (label 1),
# built by `llm_jax/data/objectives/mlm.py::PairSource` (objective `mlm`,
# `pair_task: nsp`). Below: a real line masked, the split counted over the whole text, and
# two NSP rows from the data pipeline.

# %%
special = tok.all_special_ids
random_ids = lj.data.objectives.ordinary_ids(tok.vocab_size, special)
candidates = ~np.isin(data, special)
masked, selected = lj.data.mlm_mask(
    data, candidates, np.random.default_rng(0), mask_id=tok.mask_id, random_ids=random_ids
)
sel = selected.astype(bool)
n_sel = sel.sum()
to_mask = sel & (masked == tok.mask_id)
kept = sel & (masked == data)
randomised = sel & ~to_mask & ~kept
print(
    nb.table(
        [
            {
                "what": "selected / ordinary tokens",
                "count": int(n_sel),
                "fraction": n_sel / candidates.sum(),
                "expected": 0.15,
            },
            {
                "what": "-> <mask>",
                "count": int(to_mask.sum()),
                "fraction": to_mask.sum() / n_sel,
                "expected": 0.8,
            },
            {
                "what": "-> random token",
                "count": int(randomised.sum()),
                "fraction": randomised.sum() / n_sel,
                "expected": 0.1 * (1 - 1 / len(random_ids)),
            },
            {
                "what": "-> unchanged",
                "count": int(kept.sum()),
                "fraction": kept.sum() / n_sel,
                "expected": 0.1 + 0.1 / len(random_ids),
            },
        ]
    )
)
# Binomial tolerances, 5 standard deviations.
for frac, p, n in [
    (n_sel / candidates.sum(), 0.15, candidates.sum()),
    (to_mask.sum() / n_sel, 0.8, n_sel),
]:
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), (frac, p)
span = slice(0, 160)
show = lambda ids_: tok.decode(ids_).replace("<mask>", "_")  # noqa: E731
print("original:", data[span].shape[0], "chars\n" + tok.decode(data[span]))
print("\nmasked (_ = <mask>; a random replacement shows as another character):")
print(show(masked[span]))

# %%
corpus_file = "runs/02_theory/shakespeare.txt"
os.makedirs(os.path.dirname(corpus_file), exist_ok=True)
with open(corpus_file, "w", encoding="utf-8") as f:
    f.write(text[: nb.pick(smoke=100_000, full=400_000)])
nsp_cfg = lj.DataConfig(
    paths=(corpus_file,),
    objective="mlm",
    pair_task="nsp",
    doc_split="blank_line",
    seq_len=64,
    batch_size=8,
    tokenizer_type="char",
    cache_dir="runs/02_theory/cache",
)
src = lj.data.load_source(nsp_cfg, tok)
pairs = src.build(np.arange(src.num_examples), 0)
print(f"{src.num_examples} NSP examples; label 1 (random B) in {pairs['nsp_labels'].mean():.1%}")
for row in (0, 1, 2, 3):
    n_real = int((pairs["segment_ids"][row] > 0).sum())
    what = "NotNext (random B)" if pairs["nsp_labels"][row] else "IsNext"
    types = pairs["token_type_ids"][row][:n_real]
    print(f"--- label {pairs['nsp_labels'][row]} = {what}; token types {types}")
    print(tok.decode(pairs["targets"][row][:n_real]).replace("\n", "⏎"))
assert abs(pairs["nsp_labels"].mean() - 0.5) < 5 * math.sqrt(0.25 / src.num_examples)

# %% [markdown]
# ## T5 span corruption
#
# T5 (Raffel et al. 2020) noises 15% of the tokens in spans of mean length 3; each span in
# the input is replaced by a unique sentinel `<extra_id_k>`, and the target lists each
# sentinel followed by the tokens it hides. The model is trained with cross-entropy on the
# target, $-\sum_t \log p(y_t \mid y_{<t}, \tilde x)$.
# `llm_jax/data/objectives/span.py::random_spans_noise_mask` draws the spans,
# `llm_jax/data/objectives/span.py::span_corrupt` builds the pair, and
# `llm_jax/data/objectives/span.py::reconstruct_span_corruption` inverts it.

# %%
line_ids_np = np.asarray(
    tok.encode("Now is the winter of our discontent made glorious summer by this sun of York.")
)
noise = lj.data.random_spans_noise_mask(len(line_ids_np), 0.15, 3.0, np.random.default_rng(3))
inputs, targets = lj.data.span_corrupt(line_ids_np, noise, tok.sentinel_ids)
print("input: ", tok.decode(inputs))
print("target:", tok.decode(targets))

# NumPy twin, written as a loop over spans.
inp_np, tgt_np, k_span = [], [], 0
for t_i, (tid, is_noise) in enumerate(zip(line_ids_np, noise, strict=True)):
    starts_span = is_noise and (t_i == 0 or not noise[t_i - 1])
    if starts_span:
        inp_np.append(tok.sentinel_ids[k_span])
        tgt_np.append(tok.sentinel_ids[k_span])
        k_span += 1
    if is_noise:
        tgt_np.append(tid)
    else:
        inp_np.append(tid)
np.testing.assert_array_equal(inputs, inp_np)
np.testing.assert_array_equal(targets, tgt_np)
np.testing.assert_array_equal(
    lj.data.reconstruct_span_corruption(inputs, targets, tok.sentinel_ids), line_ids_np
)
print(f"noise {noise.mean():.0%} of {len(noise)} tokens in {k_span} spans;", end=" ")
print(f"input {len(inputs)}, target {len(targets)} tokens")

# %% [markdown]
# ## Beam search vs greedy
#
# Decoding looks for $\arg\max_y \log p(y\mid x) = \sum_t \log p(y_t\mid y_{<t}, x)$.
# Greedy takes the best token at every step; beam search keeps the $k$ best prefixes by
# summed log-probability (`llm_jax/sample/strategies.py::Beam`, here with `length_penalty=0`
# so the score is the plain sum). Beam search explores more than the single greedy path, so
# its best sequence usually scores at least as high (it is not a theorem: the greedy prefix
# can fall out of the beam). Both run through `lj.sample.generate` with the trained GPT; the
# check re-scores each output with one forward pass (the chain rule of the first section)
# in float64 NumPy.

# %%
prompts = ["ROMEO:\n", "First Citizen:\n", "KING"]
p_ids = [tok.encode(p) for p in prompts]
NEW = nb.pick(smoke=16, full=40)
greedy = lj.sample.generate(
    model, p_ids, max_new_tokens=NEW, strategy=lj.sample.Greedy(), return_log_probs=True
)
beam = lj.sample.generate(
    model,
    p_ids,
    max_new_tokens=NEW,
    strategy=lj.sample.Beam(num_beams=4, length_penalty=0.0),
    return_log_probs=True,
)
outputs = [np.asarray(greedy.tokens), np.asarray(beam.tokens[:, 0])]  # [P, NEW] each
scores = [np.asarray(greedy.log_probs).sum(-1), np.asarray(beam.scores[:, 0])]  # [P] each

# NumPy twin: re-score every output with one forward pass, chain rule in float64.
rows_ids = [np.concatenate([p, out[i]]) for out in outputs for i, p in enumerate(p_ids)]
rescored = []
for (z_row, _), full_ids, prompt_ids in zip(lm_forward(rows_ids), rows_ids, p_ids * 2, strict=True):
    z64 = np.asarray(z_row, np.float64)
    z64 -= z64.max(-1, keepdims=True)
    logp64 = z64 - np.log(np.exp(z64).sum(-1, keepdims=True))
    steps = np.arange(len(prompt_ids) - 1, len(full_ids) - 1)
    rescored.append(logp64[steps, full_ids[steps + 1]].sum())
np.testing.assert_allclose(np.concatenate(scores), rescored, rtol=1e-4)

scored = list(zip(*scores, strict=True))
print(
    nb.table(
        [
            {
                "prompt": repr(p),
                "greedy": repr(tok.decode(outputs[0][i])),
                "log p greedy": float(g),
                "beam (k=4)": repr(tok.decode(outputs[1][i])),
                "log p beam": float(b),
            }
            for i, (p, (g, b)) in enumerate(zip(prompts, scored, strict=True))
        ]
    )
)
assert all(b >= g - 1e-4 for g, b in scored), "beam search scored below greedy"

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(6, 3))
xs = np.arange(len(prompts))
ax.bar(xs - 0.2, [g for g, _ in scored], 0.4, label="greedy")
ax.bar(xs + 0.2, [b for _, b in scored], 0.4, label="beam, k=4")
ax.set_xticks(xs, [repr(p) for p in prompts])
ax.set(ylabel=f"log p of {NEW} new tokens (nats)", title="sequence log-probability")
ax.legend()
plt.show()

# %%
print(f"notebook ran in {time.perf_counter() - t_start:.1f} s ({nb.runtime()}, smoke={nb.SMOKE})")
