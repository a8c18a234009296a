"""The evaluation tasks: each turns a model, a tokenizer and its file into a metrics dict.

- `perplexity`: token perplexity, mean NLL (nats/token), bits per byte
  (-sum(ll) / (bytes * ln 2), lm-evaluation-harness's definition) and word perplexity, over
  sliding windows (`loglik.rolling_requests`). Decoder-only models only.
- `classification`: accuracy, macro-F1, per-class precision / recall, confusion counts, from
  the model's `classify` head.
- `generation`: hypotheses by greedy / sampling / beam search, scored with sacrebleu BLEU and
  chrF, rouge-score ROUGE-1/2/L/Lsum and exact match.
- `multiple_choice` (and `sentiment`, its zero-shot preset on fastText review files): each
  choice scored by log p(choice | prompt); `acc` picks the highest sum, `acc_norm` the
  highest sum divided by the choice's length in characters (lm-evaluation-harness).
- `cloze`: LAMBADA-style last-word prediction: `acc` = greedy decoding produces the word
  exactly, `perplexity` = exp(-mean log p(word | passage)).

Every check on the inputs (formats, labels, lengths) runs before the first compilation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llm_jax.eval import data as data_lib
from llm_jax.eval import loglik

OnBatch = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class Prompting:
    """How prompts are built for the log-likelihood tasks.

    Attributes:
      add_bos: start every prompt with the tokenizer's BOS (our runs train with it; Hugging
        Face causal LMs are scored without, as lm-evaluation-harness does).
      template: multiple choice: the text of one item, with {context} and {choice}.
      shots: solved examples in front of each item.
      seed: the few-shot draw's seed (per item: a function of (seed, item index)).
      fewshot: the pool the shots come from; None: the evaluated items, never the item itself.
    """

    add_bos: bool = False
    template: str = data_lib.DEFAULT_TEMPLATE
    shots: int = 0
    seed: int = 1234
    fewshot: Sequence[data_lib.Choice] | None = None


def prefix_id(tokenizer: Any, add_bos: bool) -> int | None:
    """The token a document's first token is predicted from: BOS when the model was trained
    with one, else EOS (lm-evaluation-harness's end-of-text prefix), else None."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if add_bos and bos is not None:
        return bos
    return eos if eos is not None else bos


def _decoder_only(model: Any, task: str) -> None:
    if loglik.is_encoder_decoder(model) or model.cfg.family == "bert":
        raise ValueError(
            f"task {task!r} scores a causal LM's next-token probabilities; this is a "
            f"{model.cfg.family} model. Use a gpt model (MLM pseudo-perplexity is not "
            "implemented)."
        )


# Perplexity ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Windows:
    """Perplexity's work: the requests that score every token once, the window settings,
    and the size of the scored text (bits per byte and word perplexity divide by it)."""

    requests: list[loglik.Request]
    max_length: int
    stride: int
    prefix: int | None
    bytes: int
    words: int
    documents: int


def perplexity_windows(
    model: Any,
    tokenizer: Any,
    documents: Sequence[str],
    *,
    prompting: Prompting,
    max_length: int | None = None,
    stride: int | None = None,
) -> Windows:
    """The windows that score `documents` (each on its own), checked before compiling.

    Args:
      max_length: input positions per window (default: the model's length).
      stride: how far windows move (default max_length // 2: every token after the first
        window sees at least half a window of context).
    """
    _decoder_only(model, "perplexity")
    limit = loglik.model_length(model)
    max_length = limit if max_length is None else max_length
    if not 1 <= max_length <= limit:
        raise ValueError(f"--max-length {max_length} must be in [1, {limit}] for this model.")
    stride = max(1, max_length // 2) if stride is None else stride
    prefix = prefix_id(tokenizer, prompting.add_bos)
    requests: list[loglik.Request] = []
    for doc in documents:
        requests += loglik.rolling_requests(tokenizer.encode(doc), prefix, max_length, stride)
    if not requests:
        raise ValueError("the text has no token to score; give a longer text.")
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    words = sum(len(d.split()) for d in documents)
    return Windows(requests, max_length, stride, prefix, n_bytes, words, len(documents))


def held_out_windows(data_config: Any, tokenizer: Any, split: str) -> Windows:
    """The held-out chunks of a causal-LM run's own data (`data.validation_fraction` /
    `validation_paths` / `test_paths`), exactly those its evaluation reads: each chunk of
    up to seq_len + 1 tokens (BOS/EOS framed as in training) is one window whose first token
    is the context. Bytes and words are those of each chunk's scored tokens, decoded."""
    from llm_jax.data.iterator import load_source

    if data_config.objective != "clm":
        raise ValueError(
            f"--split scores a causal-LM run's held-out text; this run's objective is "
            f"{data_config.objective!r}. Pass the held-out file with --data instead."
        )
    source = load_source(data_config, tokenizer, split)
    pieces, stream = source.pieces, np.asarray(source.stream)
    requests, n_bytes, words = [], 0, 0
    for p in range(len(pieces)):
        body = stream[pieces.start[p] : pieces.start[p] + pieces.length[p]].tolist()
        ids = [int(pieces.prefix[p])] * int(pieces.prefix[p] >= 0) + body
        ids += [int(pieces.suffix[p])] * int(pieces.suffix[p] >= 0)
        if len(ids) < 2:
            continue
        requests.append(loglik.Request.of(ids[:1], ids[1:]))
        text = tokenizer.decode(ids[1:], skip_special_tokens=True)
        n_bytes, words = n_bytes + len(text.encode("utf-8")), words + len(text.split())
    if not requests:
        raise ValueError(f"the {split} split has no chunk to score.")
    T = data_config.seq_len
    return Windows(requests, T, T, requests[0].context[0], n_bytes, words, len(requests))


def perplexity(
    model: Any,
    windows: Windows,
    *,
    batch_size: int = 8,
    on_batch: OnBatch | None = None,
) -> dict[str, Any]:
    """Token perplexity, NLL, bits per byte and word perplexity over `windows`
    (`perplexity_windows` of documents, or a run's `held_out_windows`)."""
    scores = loglik.loglikelihood(
        model,
        windows.requests,
        batch_size=batch_size,
        max_length=windows.max_length,
        on_batch=on_batch,
    )
    ll = sum(s.loglikelihood for s in scores)
    tokens = sum(s.num_tokens for s in scores)
    n_bytes, words = windows.bytes, windows.words
    return {
        "perplexity": math.exp(-ll / tokens),
        "nll": -ll / tokens,
        "bits_per_byte": -ll / (n_bytes * math.log(2)),
        "word_perplexity": math.exp(-ll / max(words, 1)),
        "tokens": tokens,
        "bytes": n_bytes,
        "words": words,
        "documents": windows.documents,
        "windows": len(windows.requests),
        "max_length": windows.max_length,
        "stride": windows.stride,
        "first_token_scored": windows.prefix is not None,
    }


# Multiple choice and cloze -------------------------------------------------------------------


def choice_requests(
    tokenizer: Any, items: Sequence[data_lib.Choice], prompting: Prompting
) -> list[loglik.Request]:
    """One request per (item, choice), in item order; few-shot examples in front."""
    data_lib.check_template(prompting.template)
    pool = items if prompting.fewshot is None else prompting.fewshot
    bos = tokenizer.bos_id if prompting.add_bos else None
    fallback = prefix_id(tokenizer, prompting.add_bos)
    out = []
    for i, item in enumerate(items):
        shots = ""
        if prompting.shots:
            same = prompting.fewshot is None
            chosen = data_lib.fewshot_indices(
                len(pool), i, prompting.shots, prompting.seed, same_file=same
            )
            shots = data_lib.fewshot_prompt(prompting.template, [pool[j] for j in chosen])
        for k, choice in enumerate(item.choices):
            context, continuation = data_lib.split_template(
                prompting.template, item.context, choice
            )
            ctx, cont = data_lib.encode_pair(tokenizer, shots + context, continuation)
            if not cont:
                raise ValueError(f"item {i + 1}: choice {k} ({choice!r}) tokenizes to nothing.")
            if bos is not None:
                ctx = [bos, *ctx]
            elif not ctx and fallback is not None:
                ctx = [fallback]
            out.append(loglik.Request.of(ctx, cont))
    return out


def choice_metrics(
    items: Sequence[data_lib.Choice], scores: Sequence[loglik.Score]
) -> dict[str, Any]:
    """acc / acc_norm (lm-evaluation-harness) from the per-choice log-likelihoods, in
    `choice_requests` order. Ties go to the first choice, as numpy's argmax."""
    correct = correct_norm = 0
    it = iter(scores)
    for item in items:
        ll = np.asarray([next(it).loglikelihood for _ in item.choices])
        lengths = np.asarray([float(len(c)) for c in item.choices])
        correct += int(np.argmax(ll) == item.answer)
        correct_norm += int(np.argmax(ll / lengths) == item.answer)
    n = len(items)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "examples": n}


def multiple_choice(
    model: Any,
    items: Sequence[data_lib.Choice],
    requests: Sequence[loglik.Request],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    on_batch: OnBatch | None = None,
) -> dict[str, Any]:
    """acc and acc_norm of `items` from their `choice_requests` (see the module doc)."""
    if not loglik.is_encoder_decoder(model):
        _decoder_only(model, "multiple_choice")
    scores = loglik.loglikelihood(
        model, requests, batch_size=batch_size, max_length=max_length, on_batch=on_batch
    )
    return choice_metrics(items, scores)


def cloze(
    model: Any,
    tokenizer: Any,
    passages: Sequence[tuple[str, str]],
    *,
    prompting: Prompting,
    batch_size: int = 8,
    max_length: int | None = None,
    on_batch: OnBatch | None = None,
) -> dict[str, Any]:
    """Last-word accuracy (greedy) and perplexity of (context, word) passages."""
    _decoder_only(model, "cloze")
    bos = tokenizer.bos_id if prompting.add_bos else None
    requests = []
    for context, word in passages:
        ctx, cont = data_lib.encode_pair(tokenizer, context, " " + word)
        requests.append(loglik.Request.of(([bos] if bos is not None else []) + ctx, cont))
    scores = loglik.loglikelihood(
        model, requests, batch_size=batch_size, max_length=max_length, on_batch=on_batch
    )
    ll = np.asarray([s.loglikelihood for s in scores])
    return {
        "acc": float(np.mean([s.is_greedy for s in scores])),
        "perplexity": float(math.exp(-ll.mean())),
        "examples": len(passages),
    }


# Classification -------------------------------------------------------------------------------


def classification(
    model: Any,
    tokenizer: Any,
    labels: Sequence[str],
    texts: Sequence[str],
    *,
    label_names: Sequence[str],
    seq_len: int,
    add_bos: bool = True,
    batch_size: int = 8,
    on_batch: OnBatch | None = None,
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision / recall / F1 and the confusion matrix of a
    classifier on labelled texts (rows framed as in training, see
    `llm_jax.data.objectives.classification`)."""
    import jax
    from flax import nnx

    from llm_jax.data.objectives.classification import framed_row, row_specials
    from llm_jax.train.task_eval import classification_eval_step

    if not model.cfg.num_labels:
        raise ValueError(
            f"this {model.cfg.family} model has no classification head (num_labels=0); "
            "evaluate a checkpoint fine-tuned with objective=classification."
        )
    if len(label_names) > model.cfg.num_labels:
        raise ValueError(
            f"{len(label_names)} label names {list(label_names)} for a head of "
            f"{model.cfg.num_labels} classes."
        )
    unknown = sorted(set(labels) - set(label_names))
    if unknown:
        raise ValueError(
            f"labels {unknown} in the data are not among the model's classes "
            f"{list(label_names)}; fix the file or pass --labels in the model's class order."
        )
    first, mid, _, last = row_specials(tokenizer, add_bos)
    codes = np.asarray([list(label_names).index(x) for x in labels], np.int32)
    encoded = tokenizer.encode_batch(list(texts))
    graphdef, params = nnx.split(model)
    C = model.cfg.num_labels
    confusion = np.zeros((C, C))
    for lo in range(0, len(encoded), batch_size):
        batch = _classification_batch(
            encoded[lo : lo + batch_size],
            codes[lo : lo + batch_size],
            seq_len,
            batch_size,
            (first, mid, last),
            framed_row,
        )
        out = jax.device_get(classification_eval_step(params, batch, graphdef=graphdef))
        confusion += out["confusion"]
        if on_batch is not None:
            on_batch(min(batch_size, len(encoded) - lo), int(batch["segment_ids"].sum()))
    return classification_result(confusion, label_names)


def classification_result(confusion: np.ndarray, label_names: Sequence[str]) -> dict[str, Any]:
    """The metrics dict of `classification` from [C, C] confusion counts (rows: truth)."""
    from llm_jax.train.task_eval import classification_metrics

    m = classification_metrics(confusion)
    C = len(confusion)
    names = list(label_names) + [f"class_{i}" for i in range(len(label_names), C)]
    per_class = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(
            names, m["precision"], m["recall"], m["f1"], confusion.sum(1), strict=True
        )
    }
    return {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "per_class": per_class,
        "confusion": confusion.astype(int).tolist(),
        "labels": names,
        "examples": int(confusion.sum()),
    }


def _classification_batch(rows, codes, T, B, specials, framed_row) -> dict[str, np.ndarray]:
    first, mid, last = specials
    out = {
        k: np.zeros((B, T), np.int32)
        for k in ("tokens", "token_type_ids", "segment_ids", "positions")
    }
    out["labels"] = np.zeros(B, np.int32)
    out["label_weights"] = np.zeros(B, np.float32)
    for i, (ids, code) in enumerate(zip(rows, codes, strict=True)):
        tokens, types, n = framed_row(np.asarray(ids, np.int32), None, T, first, mid, last)
        out["tokens"][i], out["token_type_ids"][i] = tokens, types
        out["segment_ids"][i, :n] = 1
        out["positions"][i, :n] = np.arange(n)
        out["labels"][i], out["label_weights"][i] = code, 1.0
    return out


def plot_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: Any) -> None:
    """The confusion matrix as a PNG (rows: true label, columns: prediction)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(confusion)
    n = len(counts)
    fig = Figure(figsize=(1.2 + 0.6 * n, 1.0 + 0.6 * n))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            dark = counts[i, j] > counts.max() / 2
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="w" if dark else "k")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# Generation ----------------------------------------------------------------------------------


def score_generations(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """sacrebleu BLEU / chrF (+ signatures), rouge-score ROUGE-1/2/L/Lsum F-measures (mean
    over examples; Lsum with one sentence a line, `data.split_sentences`) and exact match."""
    from rouge_score import rouge_scorer

    from llm_jax.train.task_eval import score_translations

    out = score_translations(list(hypotheses), list(references))
    kinds = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds))
    totals = dict.fromkeys(kinds, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(data_lib.split_sentences(ref), data_lib.split_sentences(hyp))
        for k in kinds:
            totals[k] += scores[k].fmeasure
    return out | {k: 100 * v / max(len(hypotheses), 1) for k, v in totals.items()}


def generate_texts(
    model: Any,
    tokenizer: Any,
    sources: Sequence[str],
    *,
    strategy: Any,
    max_new_tokens: int,
    batch_size: int = 8,
    seed: int = 0,
    add_bos: bool = False,
    max_source_tokens: int | None = None,
    on_batch: OnBatch | None = None,
) -> list[str]:
    """Detokenized outputs for `sources`: an encoder–decoder reads each source (+ EOS,
    truncated to `max_source_tokens` as in seq2seq training; default the model's length)
    and writes the hypothesis; a decoder-only model continues the source and its hypothesis
    is the continuation up to the first newline."""
    import jax

    from llm_jax.sample import Beam, as_decoder, generate

    decoder = as_decoder(model)
    eos = tokenizer.eos_id
    enc_dec = decoder.info.is_encoder_decoder
    encoded = tokenizer.encode_batch(list(sources))
    if enc_dec:
        limit = max_source_tokens or decoder.info.max_encoder_length
        prompts = [[*ids[: (limit or len(ids) + 1) - 1], eos] for ids in encoded]
    else:
        bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
        prompts = [bos + ids for ids in encoded]
    newline = tokenizer.encode("\n")[-1:]
    stops = [newline] if newline and not enc_dec else []
    outputs = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compile per bucket
        out = generate(
            decoder,
            chunk,
            max_new_tokens=max_new_tokens,
            strategy=strategy,
            eos_id=eos,
            pad_id=tokenizer.pad_id or 0,
            stop_sequences=stops,
            rng=jax.random.key(seed + lo),
        )
        lists = out.to_lists()
        best = [x[0] for x in lists] if isinstance(strategy, Beam) else lists
        n = min(batch_size, len(prompts) - lo)
        for ids in best[:n]:
            outputs.append(tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0].strip())
        if on_batch is not None:
            on_batch(n, sum(len(ids) for ids in best[:n]))
    return outputs
