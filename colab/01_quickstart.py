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
# # 01 · Quickstart: tokenizer → pretraining → sampling → evaluation → Hugging Face
#
# One small GPT, start to finish: a SentencePiece tokenizer trained on tiny-Shakespeare, a
# few thousand steps of next-token pretraining with a live loss curve, four ways to decode
# from it, zero- and few-shot evaluation, and an export that `transformers` loads.
#
# Expected run time (estimates from the model's FLOPs and the step count, not measured on
# every runtime):
#
# | runtime | smoke (`LLM_JAX_SMOKE=1`) | full size |
# |---|---|---|
# | CPU (2 cores) | about 1 minute | 1–2 hours |
# | Colab TPU v5e (1 chip) | under 1 minute | about 3 minutes |
# | Colab GPU (T4) | under 1 minute | about 4 minutes |
#
# Full size is a 4-layer, 256-wide GPT (about 3.7 M parameters) trained for 2000 steps of
# 32 × 128 tokens (8.2 M tokens, ~2 × 10¹⁴ FLOPs): seconds of compute on an accelerator,
# the rest is compilation, data preparation and decoding.

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

# %% [markdown]
# ## Runtime
#
# JAX runs the same program on whatever backend the runtime has: a TPU chip, a GPU, or the
# CPU. Everything below uses `jax.devices()[0]`; nothing needs changing between them.

# %%
from pathlib import Path

import jax
import numpy as np

import llm_jax as lj
from llm_jax import notebook as nb
from llm_jax.eval.tasks import choice_requests
from llm_jax.train.config import config_from_dict
from llm_jax.train.data import stdlib_corpus
from llm_jax.train.loop import train

nb.show_devices()
for d in jax.devices():
    print(" ", d.platform, d.device_kind, d.id)
RUN = Path("runs/quickstart")  # everything this notebook writes goes under here
RUN.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Tokenizer
#
# A language model assigns a probability to a sequence of token ids $x_1 \dots x_T$, so text
# must first become ids. A SentencePiece BPE tokenizer starts from bytes/characters and
# greedily merges the most frequent adjacent pair until the vocabulary has $V$ pieces;
# byte fallback means no text is ever out of vocabulary, so `decode(encode(s)) == s`.
#
# The corpus is tiny-Shakespeare (1 MB) when the project's data folder is there, the 200 kB
# excerpt shipped with the tests otherwise, and else the Python standard library's own
# sources. The last 5 % of the text is held out for evaluation and never trained on.

# %%
corpus_path = nb.find_data("tinyshakespeare.txt", "shakespeare.txt")
if corpus_path is not None:
    text = corpus_path.read_text(encoding="utf-8")
    print(f"corpus: {corpus_path} ({len(text):,} characters)")
else:
    files = stdlib_corpus()[:40]
    text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in files)
    print(f"corpus: {len(files)} standard-library sources ({len(text):,} characters)")

text = text[: nb.pick(smoke=200_000, full=len(text))]
cut = text.rfind("\n\n", 0, int(len(text) * 0.95))  # split at a blank line
(RUN / "train.txt").write_text(text[:cut], encoding="utf-8")
(RUN / "heldout.txt").write_text(text[cut:].strip() + "\n", encoding="utf-8")
print(f"train {cut:,} characters, held out {len(text) - cut:,}")

tok = lj.data.train_tokenizer(
    RUN / "train.txt",
    model_type="bpe",
    vocab_size=nb.pick(smoke=512, full=2048),
    out_dir=RUN / "tokenizer",
)
sentence = "To be, or not to be, that is the question."
ids = tok.encode(sentence)
print(f"vocabulary: {tok.vocab_size} pieces; bos={tok.bos_id} eos={tok.eos_id}")
print(f"{len(sentence)} characters -> {len(ids)} tokens")
print(ids)
print([tok.id_to_piece(i) for i in ids])
assert tok.decode(ids) == sentence
print("round trip:", repr(tok.decode(ids)))

# %% [markdown]
# ## Pretraining
#
# Pretraining maximises the log-likelihood of the corpus under the chain rule
# $p(x_{1:T}) = \prod_t p_\theta(x_t \mid x_{<t})$, i.e. minimises the cross-entropy
#
# $$\mathcal{L}(\theta) = -\frac{1}{T}\sum_{t=1}^{T} \log p_\theta(x_t \mid x_{<t})
# \quad\text{nats/token},\qquad \text{perplexity} = e^{\mathcal{L}}.$$
#
# The run below is `llm-jax train` from Python: a config built here (the same sections as
# `configs/tiny.yaml`), the tokenizer just trained (`data.tokenizer_path`), AdamW with a
# warmup and cosine decay, and `LiveLossPlot` redrawing the train and held-out loss as it
# goes. Checkpoints land in `runs/quickstart/checkpoints`; running the cell again resumes
# from the latest one (delete the folder to start over).

# %% tags=["plot"]
steps = nb.pick(smoke=30, full=2000)
cfg = config_from_dict(
    {
        "name": "quickstart",
        "workdir": str(RUN),
        "model": {
            "preset": "gpt2-tiny",
            "d_model": nb.pick(smoke=64, full=256),
            "num_layers": nb.pick(smoke=2, full=4),
            "num_heads": 4,
            "d_ff": nb.pick(smoke=256, full=1024),
            "max_position_embeddings": 128,
        },
        "data": {
            "paths": [str(RUN / "train.txt")],
            "validation_paths": [str(RUN / "heldout.txt")],
            "doc_split": "file",  # one document: the text as it is, blank lines included
            "tokenizer_path": str(RUN / "tokenizer"),
            "seq_len": nb.pick(smoke=64, full=128),
            "batch_size": nb.pick(smoke=8, full=32),
        },
        "train": {
            "steps": steps,
            "log_every": 10,
            "eval_every": nb.pick(smoke=15, full=250),
            "eval_batches": nb.pick(smoke=2, full=8),
            "checkpoint_every": steps,
            "progress": False,
        },
        "optimizer": {
            "name": "adamw",
            "learning_rate": 3e-3,
            "warmup_steps": nb.pick(smoke=5, full=100),
            "schedule": "cosine",
            "weight_decay": 0.1,
        },
    }
)
plot = nb.LiveLossPlot(every=nb.pick(smoke=10, full=50), title="pretraining")
result = train(cfg, callbacks=[plot])
print(
    f"step {result.final_step}: train loss {result.losses.get(result.final_step, float('nan')):.3f}"
)
print("held-out loss by step:", {k: round(v, 3) for k, v in result.eval_losses.items()})

# %% [markdown]
# The curve starts near $\ln V$ (a uniform guess over the vocabulary) and falls as the model
# learns spelling, then words, then the play's layout (speaker names, line breaks).

# %%
restored = lj.convert.restore_model(RUN)  # the latest good checkpoint of the run
model = restored.model
tok = lj.data.load_tokenizer(restored.ref.tokenizer_dir())
print(f"restored step {restored.step}: {lj.models.param_table(model).splitlines()[-1]}")
print(f"uniform guess ln V = {np.log(tok.vocab_size):.3f} nats/token")

# %% [markdown]
# ## Sampling: greedy, temperature, top-p, beam
#
# Decoding picks $x_{t+1}$ from $p_\theta(\cdot \mid x_{\le t})$ one token at a time (with a
# key/value cache, so each step costs one token's forward pass):
#
# - **greedy**: $x_{t+1} = \arg\max_v p(v \mid x_{\le t})$ — deterministic, often repetitive;
# - **temperature** $\tau$: sample from $\mathrm{softmax}(z / \tau)$; $\tau < 1$ sharpens,
#   $\tau > 1$ flattens the distribution;
# - **top-p (nucleus)**: keep the smallest set of tokens whose probabilities sum to $\ge p$,
#   renormalise, sample;
# - **beam search**: keep the $k$ best partial sequences by $\sum_t \log p$ divided by
#   $\text{length}^{\alpha}$ (the length penalty), extend each by every token, keep the best
#   $k$ again.

# %%
decoder = lj.sample.as_decoder(model)  # compiled once, reused by every call below
prompt = "ROMEO:\n" if corpus_path is not None else "def "
prompt_ids = [[tok.bos_id, *tok.encode(prompt)]]  # the run trained with BOS (data.add_bos)
new = nb.pick(smoke=24, full=80)
strategies = {
    "greedy": lj.sample.Greedy(),
    "temperature 0.8": lj.sample.Sample(temperature=0.8),
    "top-p 0.9": lj.sample.Sample(temperature=1.0, top_p=0.9),
    "beam 4": lj.sample.Beam(num_beams=4),
}
samples = {}
for name, strategy in strategies.items():
    out = lj.sample.generate(
        decoder, prompt_ids, max_new_tokens=new, strategy=strategy, eos_id=tok.eos_id, rng=0
    )
    row = out.to_lists()[0]
    row = row[0] if isinstance(row[0], list) else row  # beam: the best of the beams
    samples[name] = tok.decode(row, skip_special_tokens=True)
    print(f"--- {name} ---\n{prompt}{samples[name]}\n")

# %% [markdown]
# ## Zero- and few-shot evaluation
#
# `lj.eval.evaluate(model, tokenizer, task, data)` scores a model the way
# lm-evaluation-harness does. **Perplexity** on the held-out text slides windows of the
# model's length over it and scores each token once; bits per byte
# $= -\sum_t \log p(x_t \mid x_{<t}) / (\text{bytes} \cdot \ln 2)$ compares models with
# different tokenizers.
#
# **Multiple choice** scores each choice $c$ by $\log p(c \mid \text{prompt})$, summed over
# its tokens, and picks the highest (`acc`; `acc_norm` divides by the choice's length in
# characters). *Zero-shot* means the prompt is the item alone; *k-shot* puts $k$ solved
# examples in front of it. Our item: the first half of a held-out line, and the choice
# between its real second half and the second half of another line.

# %%
ppl = lj.eval.evaluate(model, tok, "perplexity", RUN / "heldout.txt", add_bos=True, progress=False)
print(nb.table([{k: v for k, v in ppl["metrics"].items() if isinstance(v, float | int)}]))
if result.eval_losses:  # empty when the training cell only resumed a finished run
    last = max(result.eval_losses)
    print(
        f"nll {ppl['metrics']['nll']:.3f} nats/token; the run's own held-out loss at step "
        f"{last}: {result.eval_losses[last]:.3f} (rows of {cfg.data.seq_len} tokens: less "
        "context per token than the sliding windows)"
    )

rng = np.random.default_rng(0)


def short(text: str, limit: int = 24) -> bool:
    """Short enough that 2 shots + the item fit the model's 128 positions."""
    return len(tok.encode(text)) <= limit


lines = [ln.strip() for ln in (RUN / "heldout.txt").read_text().splitlines()]
lines = [ln for ln in lines if len(ln.split()) >= 6 and short(ln)]
halves = [(" ".join(ln.split()[:3]), " ".join(ln.split()[3:])) for ln in lines]
halves = halves[: nb.pick(smoke=24, full=200)]
items = []
for i, (head, tail) in enumerate(halves):
    other = halves[(i + 1 + rng.integers(len(halves) - 1)) % len(halves)][1]
    answer = int(rng.integers(2))
    choices = (tail, other) if answer == 0 else (other, tail)
    items.append(lj.eval.Choice(head, choices, answer))
print("an item:", items[0])
two_shot = choice_requests(tok, items, lj.eval.Prompting(add_bos=True, shots=2))[0]
print("its 2-shot prompt, choice 0:", repr(tok.decode(two_shot.context + two_shot.continuation)))
tasks = {"continue the line": ("multiple_choice", items)}

sentiment = nb.find_data("sentiment-pang-lee-200.txt")
if sentiment is not None:
    reviews = [c for c in lj.eval.read_task_data("sentiment", sentiment) if short(c.context)]
    tasks["sentiment (movie reviews)"] = ("sentiment", reviews[: nb.pick(smoke=16, full=200)])
else:
    print("sentiment-pang-lee-200.txt not found: the sentiment rows are skipped")

rows = []
for name, (task, data) in tasks.items():
    for shots in (0, 2):
        r = lj.eval.evaluate(model, tok, task, data, shots=shots, add_bos=True, progress=False)
        metrics = {k: r["metrics"][k] for k in ("acc", "acc_norm")}
        rows.append({"task": name, "items": len(data), "shots": shots, **metrics, "chance": 0.5})
print(nb.table(rows))

# %% [markdown]
# Read the accuracies against the chance column. In smoke mode (30 steps) they are noise:
# the model has barely learnt spelling, and its scores hardly depend on the shots in front
# of the item. A 400-step, 1.1 M-parameter version of this run (measured on CPU) reached
# 0.53 / 0.52 (0 / 2 shots) on the line task and 0.46 on 28 short movie reviews: a model
# this small predicts from the last few tokens, so neither a longer prompt nor solved
# examples help it. In-context learning comes with scale (GPT-3 has about $5 \times 10^4$
# times the parameters of the full-size model here).

# %% [markdown]
# ## Export to Hugging Face
#
# `lj.convert.save_hf` writes `config.json`, `model.safetensors` and the tokenizer in the
# layout `transformers` reads (a learned-position GPT becomes `GPT2LMHeadModel`). Loading
# it back with our reader, and with `transformers` when it is installed, must give the same
# logits as the model in memory.

# %%
hf_dir = lj.convert.save_hf(model, RUN / "hf", tokenizer=tok, add_bos=True)
print(sorted(p.name for p in Path(hf_dir).iterdir()))
ids = np.asarray([[tok.bos_id, *tok.encode(sentence)]], np.int32)
# Full float32 matmuls: TPUs (bf16 passes) and recent GPUs (TF32) round them by default,
# which would hide a conversion error behind ~1e-2 of noise against PyTorch on the CPU.
with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(ids))
    again = np.asarray(lj.convert.load_hf(hf_dir)(ids))
np.testing.assert_allclose(again, ours, rtol=1e-5, atol=1e-5)
print(f"reloaded with llm_jax: max |Δlogit| = {np.abs(again - ours).max():.2e}")

if importlib.util.find_spec("transformers") and importlib.util.find_spec("torch"):
    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    print(
        f"{type(hf_model).__name__} (transformers {transformers.__version__}): "
        f"max |Δlogit| = {np.abs(theirs - ours).max():.2e}"
    )
else:
    print("transformers not installed: skipped (pip install transformers torch)")
