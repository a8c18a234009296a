"""`evaluate`: one task on one data file, with a progress bar, as a JSON-ready dict.

    result = lj.eval.evaluate(model, tokenizer, "perplexity", "held_out.txt")
    result["metrics"]["bits_per_byte"]

The tasks and their file formats are described in `llm_jax.eval.tasks` and
`llm_jax.eval.data`; `llm-jax eval` is this function behind a loader and a printed table.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_jax.eval import data as data_lib
from llm_jax.eval import loglik, tasks

TASKS = ("perplexity", "classification", "generation", "multiple_choice", "sentiment", "cloze")
LOGLIK_TASKS = ("multiple_choice", "sentiment", "cloze")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}.")


def read_task_data(
    task: str,
    path: str | os.PathLike,
    *,
    limit: int | None = None,
    documents: str = "file",
    label_column: int = 1,
    text_column: int = 0,
    source_column: int = 0,
    target_column: int = 1,
) -> list[Any]:
    """The task's examples from `path` (the first `limit`), checked before any compilation."""
    check_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1; got {limit}.")
    if task == "perplexity":
        items: list[Any] = data_lib.read_documents(path, documents)
    elif task == "classification":
        items = list(zip(*data_lib.read_labelled(path, label_column, text_column), strict=True))
    elif task == "generation":
        items = list(zip(*data_lib.read_pairs(path, source_column, target_column), strict=True))
    elif task == "multiple_choice":
        items = data_lib.read_multiple_choice(path)
    elif task == "sentiment":
        items = data_lib.read_sentiment(path)
    else:
        items = data_lib.read_cloze(path)
    return items[:limit]


class _Counter:
    """Examples and tokens done, shown on a progress bar (stderr) with their rates."""

    def __init__(self, total: int, desc: str, enabled: bool):
        from llm_jax.train.metrics import Progress

        self.examples = self.tokens = 0
        self.t0 = time.perf_counter()
        self.bar = Progress(total, desc=desc, unit="ex", file=sys.stderr, enabled=enabled)

    def __call__(self, examples: int, tokens: int) -> None:
        self.examples += examples
        self.tokens += tokens
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rates = {"examples_per_second": self.examples / dt, "tokens_per_second": self.tokens / dt}
        self.bar.update(min(self.examples, self.bar.total), rates)

    def close(self) -> dict[str, float]:
        self.bar.close()
        dt = time.perf_counter() - self.t0
        return {
            "seconds": dt,
            "examples_per_second": self.examples / dt,
            "tokens_per_second": self.tokens / dt,
        }


def default_strategy(model: Any) -> Any:
    """Beam search (4 beams) for an encoder–decoder, greedy for a decoder-only model."""
    from llm_jax.sample import Beam, Greedy

    return Beam(num_beams=4) if loglik.is_encoder_decoder(model) else Greedy()


def strategy_settings(strategy: Any) -> dict[str, Any]:
    import dataclasses

    return {"strategy": type(strategy).__name__.lower(), **dataclasses.asdict(strategy)}


def evaluate(
    model: Any,
    tokenizer: Any,
    task: str,
    data: str | os.PathLike | Sequence[Any],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    add_bos: bool = False,
    max_length: int | None = None,
    stride: int | None = None,
    documents: str = "file",
    template: str | None = None,
    shots: int = 0,
    seed: int = 1234,
    fewshot_data: str | os.PathLike | None = None,
    strategy: Any = None,
    max_new_tokens: int = 64,
    max_source_tokens: int | None = None,
    labels: Sequence[str] | None = None,
    seq_len: int | None = None,
    label_column: int = 1,
    text_column: int = 0,
    source_column: int = 0,
    target_column: int = 1,
    hypotheses_path: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluates `model` on `task` over the file `data`.

    Args:
      model: a GPT, BERT or T5 model of ours (`convert.restore_model(...).model`,
        `convert.load_hf(...)`).
      tokenizer: its tokenizer (`convert.load_hf_tokenizer`).
      task: one of `TASKS`.
      data: the task's file (formats: `llm_jax.eval.data`), or its examples as
        `read_task_data` returns them (documents; (label, text) or (source, reference)
        pairs; `Choice`s; (context, word) pairs).
      batch_size: rows per compiled call (the last batch is padded: one compile per shape).
      limit: evaluate the first `limit` examples only.
      add_bos: prompts (and perplexity's first window) start with BOS, as in our training.
      max_length, stride: perplexity's sliding window (`tasks.perplexity`); max_length also
        caps the other log-likelihood tasks.
      documents: perplexity: "file" (one document) or "lines".
      template, shots, seed, fewshot_data: multiple choice (`tasks.Prompting`); default
        template "{context} {choice}" (sentiment: "Review: {context}\\nSentiment: {choice}").
      strategy, max_new_tokens: generation (default `default_strategy`).
      max_source_tokens: generation: encoder inputs are cut to this many tokens with EOS
        (a seq2seq run's `data.seq_len`; default the model's length).
      labels: classification: the class names in the head's order.
      seq_len: classification row length (default: the model's length).
      label_column, text_column: classification TSV columns (0-based).
      source_column, target_column: generation TSV columns (0-based).
      hypotheses_path: generation: write the hypotheses there, one a line.
      progress: show a progress bar on stderr.

    Returns:
      {"task", "data", "data_sha256", "examples", "metrics": {...}, "settings": {...},
      "seconds", "examples_per_second", "tokens_per_second"} (+ "sacrebleu" signatures for
      generation).
    """
    if isinstance(data, str | os.PathLike):
        items = read_task_data(
            task,
            data,
            limit=limit,
            documents=documents,
            label_column=label_column,
            text_column=text_column,
            source_column=source_column,
            target_column=target_column,
        )
        name, digest = str(data), data_lib.file_sha256(data)
    else:
        check_task(task)
        items = list(data)[:limit]
        name, digest = f"{len(items)} examples given in memory", data_lib.items_sha256(items)
    if not items:
        raise ValueError("no examples to evaluate.")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1; got {batch_size}.")
    settings: dict[str, Any] = {"batch_size": batch_size, "add_bos": add_bos}
    # `work`: the progress bar's total (examples; perplexity: windows; choices: one a choice).
    run, work = _runner(model, tokenizer, task, items, settings, locals())
    total = len(items)
    counter = _Counter(work, f"eval {task}", progress)
    try:
        metrics = run(counter)
    finally:
        timing = counter.close()
    result = {
        "task": task,
        "data": name,
        "data_sha256": digest,
        "examples": total,
        "metrics": metrics,
        "settings": settings,
        **timing,
    }
    if task == "perplexity":
        # A perplexity example is one window; tokens are the scored ones (no overlaps).
        result["windows_per_second"] = result.pop("examples_per_second")
    if "signature" in metrics:
        result["sacrebleu"] = metrics.pop("signature")
    return result


def evaluate_split(
    model: Any,
    tokenizer: Any,
    data_config: Any,
    split: str = "validation",
    *,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Perplexity of a causal-LM run on its own held-out split (`tasks.held_out_windows`):
    the chunks its evaluation reads, every one scored in full.

    Returns: as `evaluate` for task "perplexity", with "data" naming the split and
    "data_sha256" the SHA-256 of the scored token ids.
    """
    import hashlib

    import numpy as np

    windows = tasks.held_out_windows(data_config, tokenizer, split)
    ids = np.concatenate(
        [np.asarray(r.context + r.continuation, np.int32) for r in windows.requests]
    )
    counter = _Counter(len(windows.requests), f"eval {split}", progress)
    try:
        metrics = tasks.perplexity(model, windows, batch_size=batch_size, on_batch=counter)
    finally:
        timing = counter.close()
    result = {
        "task": "perplexity",
        "data": f"{split} split of the run's data ({_paths(data_config.paths)})",
        "data_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
        "examples": len(windows.requests),
        "metrics": metrics,
        "settings": {"batch_size": batch_size, "split": split, "seq_len": data_config.seq_len},
        **timing,
    }
    result["windows_per_second"] = result.pop("examples_per_second")
    return result


def _paths(paths: Sequence[str]) -> str:
    return paths[0] if len(paths) == 1 else f"{len(paths)} files: {paths[0]}, ..."


def _runner(model, tokenizer, task, items, settings, args):
    """(the task's closure over its checked inputs, the units of work it reports): every
    check runs here, before any compilation; the closure does the device work."""
    batch_size = args["batch_size"]
    if task == "perplexity":
        settings |= {"documents": args["documents"]}
        windows = tasks.perplexity_windows(
            model,
            tokenizer,
            items,
            prompting=tasks.Prompting(add_bos=args["add_bos"]),
            max_length=args["max_length"],
            stride=args["stride"],
        )
        run = functools.partial(tasks.perplexity, model, windows, batch_size=batch_size)
        return lambda on: run(on_batch=on), len(windows.requests)
    if task in ("multiple_choice", "sentiment"):
        return _choice_runner(model, tokenizer, task, items, settings, args)
    if task == "cloze":
        prompting = tasks.Prompting(add_bos=args["add_bos"])
        return lambda on: tasks.cloze(
            model,
            tokenizer,
            items,
            prompting=prompting,
            batch_size=batch_size,
            max_length=args["max_length"],
            on_batch=on,
        ), len(items)
    if task == "classification":
        return _classification_runner(model, tokenizer, items, settings, args), len(items)
    return _generation_runner(model, tokenizer, items, settings, args), len(items)


def _choice_runner(model, tokenizer, task, items, settings, args):
    default = data_lib.SENTIMENT_TEMPLATE if task == "sentiment" else data_lib.DEFAULT_TEMPLATE
    template = args["template"] or default
    fewshot = None
    if args["fewshot_data"] is not None:
        fewshot = read_task_data(task, args["fewshot_data"])
    prompting = tasks.Prompting(
        add_bos=args["add_bos"],
        template=template,
        shots=args["shots"],
        seed=args["seed"],
        fewshot=fewshot,
    )
    settings |= {
        "template": template,
        "shots": prompting.shots,
        "seed": prompting.seed,
        "fewshot_data": None if fewshot is None else str(args["fewshot_data"]),
    }
    # Build (and so check) every request before the first compilation.
    requests = tasks.choice_requests(tokenizer, items, prompting)
    limit = loglik.model_length(model) if args["max_length"] is None else args["max_length"]
    loglik.check_requests(
        requests, max_length=limit, encoder_decoder=loglik.is_encoder_decoder(model)
    )
    run = functools.partial(
        tasks.multiple_choice,
        model,
        items,
        requests,
        batch_size=args["batch_size"],
        max_length=args["max_length"],
    )
    return lambda on: run(on_batch=on), len(requests)


def _classification_runner(model, tokenizer, items, settings, args):
    labels = args["labels"]
    if labels is None:
        labels = sorted({label for label, _ in items})
    seq_len = args["seq_len"] or loglik.model_length(model)
    settings |= {"labels": list(labels), "seq_len": seq_len}
    gold, texts = [x[0] for x in items], [x[1] for x in items]
    return lambda on: tasks.classification(
        model,
        tokenizer,
        gold,
        texts,
        label_names=labels,
        seq_len=seq_len,
        add_bos=args["add_bos"],
        batch_size=args["batch_size"],
        on_batch=on,
    )


def _generation_runner(model, tokenizer, items, settings, args):
    strategy = args["strategy"] or default_strategy(model)
    settings |= {
        **strategy_settings(strategy),
        "max_new_tokens": args["max_new_tokens"],
        "max_source_tokens": args["max_source_tokens"],
    }
    sources, references = [x[0] for x in items], [x[1] for x in items]
    out = args["hypotheses_path"]

    def run(on):
        hypotheses = tasks.generate_texts(
            model,
            tokenizer,
            sources,
            strategy=strategy,
            max_new_tokens=args["max_new_tokens"],
            batch_size=args["batch_size"],
            seed=args["seed"],
            add_bos=args["add_bos"],
            max_source_tokens=args["max_source_tokens"],
            on_batch=on,
        )
        if out is not None:
            Path(out).write_text("".join(h.replace("\n", " ") + "\n" for h in hypotheses))
        return tasks.score_generations(hypotheses, references)

    return run
