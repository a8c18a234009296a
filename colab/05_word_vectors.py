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
# # 05 · Word vectors: Word2Vec and ELMo
#
# Static word vectors first: Word2Vec's skip-gram and CBOW, each trained with negative
# sampling and with hierarchical softmax (`llm_jax.models.word2vec`), scored by nearest
# neighbours, analogies and WordSim-353 (`llm_jax.eval.word_vectors`) and drawn in two
# dimensions. Then contextual vectors: a small ELMo biLM (`llm_jax.models.elmo`) gives the
# same word a different vector in each sentence.
#
# Expected run time (estimates from the corpus sizes and step counts, not measurements on
# those runtimes): smoke mode (`LLM_JAX_SMOKE=1`, CPU) about a minute; full size 15-25
# minutes on a Colab TPU v5e or a T4/L4 GPU, most of it the four Word2Vec runs over the
# 6.3M-word dictionary corpus (Word2Vec's sparse updates gain little from an accelerator:
# on a Colab CPU runtime the same run takes about as long).

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
import itertools
import re
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from llm_jax import notebook as nb
from llm_jax.eval import word_vectors as wvs
from llm_jax.models import word2vec as w2v

nb.show_devices()
RUNS = Path("runs/word_vectors")
RUNS.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The corpus
#
# Smoke mode trains on `lee-background.txt` (gensim's 60k-word news test corpus) and full
# size on `english-dict-corpus.txt` (6.3M words of dictionary definitions), whichever is
# found in `../shared/data`; without them, tiny-Shakespeare (or the test excerpt), else
# the Python standard library's source. Words are lower-cased runs of letters, one line a
# sentence: the trainer splits on whitespace, as the original tool does.

# %%
names = nb.pick(
    smoke=(
        "lee-background.txt",
        "english-dict-corpus.txt",
        "tinyshakespeare.txt",
        "shakespeare.txt",
    ),
    full=(
        "english-dict-corpus.txt",
        "lee-background.txt",
        "tinyshakespeare.txt",
        "shakespeare.txt",
    ),
)
source = nb.find_data(*names)
max_lines = nb.pick(smoke=20_000, full=None)
if source is not None:
    with open(source, encoding="utf-8", errors="replace") as f:
        lines = list(itertools.islice(f, max_lines))
else:
    from llm_jax.train.data import stdlib_corpus

    lines = [line for p in stdlib_corpus()[:60] for line in Path(p).read_text().splitlines()]
words_re = re.compile(r"[a-z]+(?:'[a-z]+)?")
sentences = [" ".join(words_re.findall(line.lower())) for line in lines]
corpus = RUNS / "corpus.txt"
corpus.write_text("\n".join(s for s in sentences if s) + "\n", encoding="utf-8")
n_words = sum(len(s.split()) for s in sentences)
print(f"{source or 'stdlib source'}: {len(lines):,} lines, {n_words:,} words -> {corpus}")

# %% [markdown]
# ## Skip-gram and CBOW
#
# Both models give every word $w$ an input vector $v_w$ (the word vector we keep) and an
# output vector $u_w$, and slide a window of up to $c$ words around each position $t$ of
# the corpus $w_1 \dots w_N$.
#
# **Skip-gram** predicts each context word from the centre word:
# $$ \max_{u, v}\ \frac{1}{N} \sum_{t=1}^{N} \sum_{-c \le j \le c,\ j \ne 0}
#    \log p(w_{t+j} \mid w_t), \qquad
#    p(o \mid i) = \frac{\exp(u_o^\top v_i)}{\sum_{w=1}^{V} \exp(u_w^\top v_i)}. $$
#
# **CBOW** (continuous bag of words) predicts the centre word from the mean of its context:
# $$ \max_{u, v}\ \frac{1}{N} \sum_{t} \log p(w_t \mid h_t), \qquad
#    h_t = \frac{1}{2c} \sum_{-c \le j \le c,\ j \ne 0} v_{w_{t+j}}. $$
#
# The trainer also draws each position's window size uniformly in $[1, c]$ (near words
# count more) and drops frequent words with probability
# $1 - \left(\sqrt{z_w / t} + 1\right) t / z_w$, where $z_w$ is the word's share of the corpus
# and $t = 10^{-3}$ (`keep_probability`), as word2vec.c and gensim do.

# %% [markdown]
# ## Negative sampling and hierarchical softmax
#
# The softmax over all $V$ words costs $O(V)$ per prediction; the two objectives replace it.
#
# **Negative sampling** (`ops.negative_sampling_loss`) turns each (input, output) pair into
# a logistic regression against $k$ noise words drawn from the unigram distribution raised
# to $3/4$, $P_n(w) \propto \mathrm{count}(w)^{3/4}$:
# $$ \mathcal{L}_{\mathrm{NS}} = -\log \sigma(u_o^\top h)
#    - \sum_{i=1}^{k} \log \sigma(-u_{n_i}^\top h), \qquad n_i \sim P_n. $$
#
# **Hierarchical softmax** (`ops.hierarchical_softmax_loss`) puts the words at the leaves
# of a Huffman tree built from their counts (`huffman`): frequent words get short codes.
# A word's probability is the product of binary decisions along its path of inner nodes
# $n_1 \dots n_L$ with code bits $d_l$, each inner node having its own vector $u_{n_l}$:
# $$ p(o \mid h) = \prod_{l=1}^{L} \sigma\!\big((1 - 2 d_l)\, u_{n_l}^\top h\big), \qquad
#    \mathcal{L}_{\mathrm{HS}} = -\sum_{l=1}^{L}
#    \log \sigma\!\big((1 - 2 d_l)\, u_{n_l}^\top h\big), $$
# $O(\log V)$ per prediction, and the probabilities sum to 1 over the vocabulary exactly.
#
# Each update is one jitted sparse step: gather the rows an example touches, take the
# gradient of the loss with respect to them, scatter-add $-\eta\,\nabla$ back (plain SGD
# with a learning rate decayed linearly from 0.025, the original recipe). The four
# combinations, on the same corpus and hyperparameters:

# %%
base = w2v.Word2VecConfig(
    dim=nb.pick(smoke=50, full=100),
    window=5,
    min_count=nb.pick(smoke=3, full=5),
    epochs=nb.pick(smoke=5, full=5),
    negative=5,
)
analogy_file = nb.find_data("word-analogies.txt")
wordsim_file = nb.find_data("wordsim353.tsv")
models, rows = {}, []
for model_kind in ("sg", "cbow"):
    for loss in ("ns", "hs"):
        cfg = base.replace(model=model_kind, loss=loss)
        t0 = time.perf_counter()
        trained = w2v.train(cfg, [corpus])
        seconds = time.perf_counter() - t0
        wv = trained.word_vectors()
        models[f"{model_kind}-{loss}"] = wv
        row = {
            "model": f"{model_kind}-{loss}",
            "vocabulary": len(wv.words),
            "seconds": seconds,
            "words/s": base.epochs * n_words / seconds,
        }
        if wordsim_file is not None:
            ws = wvs.wordsim(wv, wordsim_file)
            row["WordSim ρ"], row["WordSim OOV"] = ws["spearman"], ws["oov"]
        if analogy_file is not None:
            total = wvs.analogies(wv, analogy_file, restrict_vocab=30_000)["total"]
            row["analogies 3CosAdd"], row["analogy OOV"] = total["3cosadd"], total["oov"]
        rows.append(row)
display(Markdown(nb.table(rows)))

# %% [markdown]
# The seconds include each variant's compilation. The scores need a large corpus: on the
# 60k words of the smoke corpus (5 passes over it) most WordSim pairs and analogy
# questions are out of the vocabulary (the OOV columns) and the rest are barely above
# chance; the full-size run on 6.3M words (5 passes) is where they become meaningful
# (`python benchmarks/word2vec.py` compares ours with gensim 4 on the same corpus, same
# scores).

# %% [markdown]
# ## Nearest neighbours and analogies
#
# Similarity is the cosine $\cos(a, b) = a^\top b / (\lVert a \rVert \lVert b \rVert)$.
# An analogy $a : b :: c : ?$ is answered by 3CosAdd, the word closest to
# $v_b - v_a + v_c$ (the three query words excluded):
# $$ d^\ast = \arg\max_{d \notin \{a, b, c\}} \cos(v_d,\ v_b - v_a + v_c). $$

# %%
wv = models["sg-ns"]
probes = [
    w
    for w in ("government", "police", "water", "two", "king", "fire", "house")
    if wv.lookup(w) is not None
]
probes = probes or list(wv.words[50:54])
for word in probes[:5]:
    neighbours = ", ".join(f"{w} ({s:.2f})" for w, s in wv.nearest([word], topn=6))
    print(f"{word:>12}: {neighbours}")

queries = [("man", "king", "woman"), ("day", "night", "summer"), ("good", "better", "bad")]
for a, b, c in queries:
    if wv.missing([a, b, c]):
        print(f"{a} : {b} :: {c} : ?  (not in the vocabulary: {wv.missing([a, b, c])})")
        continue
    top = wv.nearest([b, c], [a], topn=3)
    print(f"{a} : {b} :: {c} : " + ", ".join(f"{w} ({s:.2f})" for w, s in top))

# %% [markdown]
# ## A 2-D projection
#
# Principal component analysis of the unit-length vectors of a few chosen words: centre
# the matrix $X$ ($n$ words $\times$ $D$), take its SVD $X = U \Sigma W^\top$ and plot the
# coordinates on the first two right singular vectors, $X W_{:, :2} = U_{:, :2}\Sigma_{:2}$.
# Two dimensions keep only a part of the geometry (the explained variance is printed).

# %%
groups = {
    "numbers": ["one", "two", "three", "four", "five", "six", "ten", "hundred"],
    "family": ["father", "mother", "son", "daughter", "brother", "sister", "wife", "husband"],
    "time": ["day", "night", "week", "year", "month", "morning", "hour", "today"],
    "places": ["city", "town", "country", "house", "river", "street", "village", "island"],
}
chosen = [(w, g) for g, ws in groups.items() for w in ws if wv.lookup(w) is not None]
if len(chosen) < 6:  # a small corpus without these words: its most frequent words instead
    chosen = [(w, "frequent") for w in wv.words[20:60]]
X = np.stack([wv.unit[wv.lookup(w)] for w, _ in chosen])
X = X - X.mean(axis=0)
U, S, Wt = np.linalg.svd(X, full_matrices=False)
coords = U[:, :2] * S[:2]
explained = (S[:2] ** 2).sum() / (S**2).sum()
print(f"{len(chosen)} words; the two components explain {explained:.0%} of their variance")

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(7, 5.5))
for g in dict.fromkeys(g for _, g in chosen):
    idx = [i for i, (_, gi) in enumerate(chosen) if gi == g]
    ax.scatter(coords[idx, 0], coords[idx, 1], label=g, s=20)
    for i in idx:
        ax.annotate(chosen[i][0], coords[i], fontsize=8, xytext=(3, 2), textcoords="offset points")
ax.set(title="skip-gram (NS) vectors, PCA", xlabel="PC 1", ylabel="PC 2")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## ELMo: contextual vectors
#
# A Word2Vec vector is one per word type: "bank" of a river and "bank" of money share it.
# ELMo (Peters et al. 2018) reads the whole sentence with two LSTM language models, one
# left to right, $p(w_t \mid w_{<t})$, and one right to left, $p(w_t \mid w_{>t})$, on top
# of a character CNN that encodes each word from its letters. Trained jointly,
# $$ \max \sum_{t} \Big(
#    \log p(w_t \mid w_1, \dots, w_{t-1}; \Theta_x, \overrightarrow{\Theta}, \Theta_s)
#    + \log p(w_t \mid w_{t+1}, \dots, w_N; \Theta_x, \overleftarrow{\Theta}, \Theta_s) \Big), $$
# with the char encoder $\Theta_x$ and the softmax $\Theta_s$ shared. Word $t$'s
# representation at layer $j$ is $h_{t,j} = [\overrightarrow{h}_{t,j}; \overleftarrow{h}_{t,j}]$;
# layer 0 is the context-free char-CNN vector, layers $1..L$ depend on the sentence, and a
# task mixes them as $\gamma \sum_j s_j h_{t,j}$ with softmax-normalised $s$ (`ScalarMix`).
#
# A small biLM trains here for a few steps with the library's trainer
# (`llm_jax.models.elmo_train`, the engine of `llm-jax train configs/elmo_tiny.yaml`); at
# this size the numbers show the mechanics, not ELMo's published quality.

# %%
from llm_jax.models import elmo_train
from llm_jax.models.elmo import ElmoConfig

elmo_text = nb.find_data("tinyshakespeare.txt", "shakespeare.txt", "lee-background.txt")
elmo_cfg = elmo_train.ElmoRunConfig(
    name="elmo_notebook",
    workdir=str(RUNS / "elmo"),
    model=ElmoConfig(
        max_chars=20,
        char_embed_dim=8,
        filters=nb.pick(
            smoke=((1, 16), (2, 16), (3, 32)), full=((1, 32), (2, 32), (3, 64), (4, 64), (5, 64))
        ),
        num_layers=2,
        cell_dim=nb.pick(smoke=64, full=256),
        proj_dim=nb.pick(smoke=32, full=64),
    ),
    data=elmo_train.ElmoDataConfig(
        paths=(str(elmo_text or corpus),),
        seq_len=20,
        batch_size=nb.pick(smoke=16, full=32),
        max_lines=nb.pick(smoke=3000, full=0),
        max_vocab=nb.pick(smoke=2000, full=5000),
    ),
    train=elmo_train.ElmoTrainConfig(
        steps=nb.pick(smoke=30, full=1000),
        eval_every=0,
        eval_batches=2,
        checkpoint_every=nb.pick(smoke=30, full=1000),
        progress=False,
    ),
)
run = elmo_train.train(elmo_cfg)
ppl = run.eval
print(
    f"{run.final_step} steps in {run.seconds:.0f} s; held-out perplexity "
    f"forward {ppl['forward_ppl']:.0f}, backward {ppl['backward_ppl']:.0f}"
)
elmo, vocab = elmo_train.load(run.workdir)

# %%
word = "bank"
sentences = [
    "he sat on the bank of the river and watched the water".split(),
    "she took the money to the bank in the city".split(),
    "they walked along the grassy bank of the stream".split(),
]
layers, mask = elmo_train.embed_sentences(elmo, sentences, batch_size=4, length=16)
# [N, L+1, T, 2D]; position 0 is <S>, so word i of a sentence is at position i + 1.
at = [s.index(word) + 1 for s in sentences]
vectors = np.stack([layers[i, :, at[i]] for i in range(len(sentences))])  # [N, L+1, 2D]


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


elmo_rows = [
    {
        "layer": "0 (char CNN, static)" if j == 0 else f"{j} (biLSTM)",
        "river vs money": cosine(vectors[0, j], vectors[1, j]),
        "river vs stream": cosine(vectors[0, j], vectors[2, j]),
    }
    for j in range(vectors.shape[1])
]
display(Markdown(nb.table(elmo_rows)))

# %% tags=["plot"]
fig, ax = plt.subplots(figsize=(6, 3.5))
xs = np.arange(len(elmo_rows))
ax.bar(xs - 0.2, [r["river vs money"] for r in elmo_rows], 0.4, label="river bank vs money bank")
ax.bar(xs + 0.2, [r["river vs stream"] for r in elmo_rows], 0.4, label="river bank vs stream bank")
ax.set_xticks(xs, [r["layer"] for r in elmo_rows])
ax.set(ylabel="cosine of the two 'bank' vectors", title="ELMo: one word, three contexts")
ax.legend(loc="lower left")
fig.tight_layout()
plt.show()

# %% [markdown]
# Layer 0 reads only the letters of "bank", so its three vectors are identical (cosine 1):
# that is a static vector, like Word2Vec's. The biLSTM layers see the sentence, so the
# same word gets different vectors; with a well-trained biLM (the full-size run, or the
# published models trained on a billion words) the two river senses stay closer to each
# other than to the money sense, which is what makes ELMo's upper layers useful for word
# sense and its lower ones for syntax.
