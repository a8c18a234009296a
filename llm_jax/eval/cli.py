"""`llm-jax eval`: evaluate a checkpoint or a Hugging Face folder on one task.

    llm-jax eval --checkpoint runs/tiny --task perplexity --data held_out.txt
    llm-jax eval --hf smollm2 --task sentiment --data ../shared/data/sentiment-mr.test.txt
    llm-jax eval --checkpoint runs/translate --task generation --data pairs.tsv --num-beams 4

It prints what it loaded, a progress bar (stderr), a table of the metrics, and as its last
stdout line one JSON object with the metrics and everything needed to reproduce them (task,
data file and SHA-256, model, decoding and prompt settings, sacrebleu signatures); `--out`
writes the same JSON, and beside it the hypotheses (generation) or the confusion-matrix
PNG (classification).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llm_jax.eval.api import TASKS, check_task


def _label_names(args: argparse.Namespace, loaded: Any) -> list[str] | None:
    """The classifier's class names in head order: --labels, else the run's
    data.label_names, else its training files' sorted labels, else an HF id2label."""
    if args.labels:
        return [x.strip() for x in args.labels.split(",")]
    data = loaded.run_config.get("data") or {}
    if data.get("label_names"):
        return list(data["label_names"])
    if data.get("paths") and data.get("objective") == "classification":
        from llm_jax.data import DataConfig
        from llm_jax.data import corpus as corpus_lib

        config = DataConfig.from_dict(data)
        try:
            if config.format == "fasttext":
                labels, _, _ = corpus_lib.read_fasttext(config.paths, config.file_pattern)
            else:
                (labels,), _ = corpus_lib.read_tsv_columns(
                    config.paths, [config.label_column], config.file_pattern
                )
        except ValueError as e:
            raise ValueError(
                f"cannot read the run's training labels ({e}); pass --labels in the head's "
                "class order."
            ) from e
        return sorted(set(labels))
    id2label = loaded.hf_config.get("id2label") or {}
    names = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
    if names and not all(n.startswith("LABEL_") for n in names):
        return names
    return None


def _settings_from_run(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """Defaults that follow the model's training: BOS framing, classification columns and
    row length; flags given on the command line win."""
    data = loaded.run_config.get("data") or {}
    add_bos = args.add_bos
    if add_bos is None:
        # Our runs frame documents with BOS by default; HF causal LMs are scored without.
        add_bos = bool(data.get("add_bos", True)) if loaded.run_config else False
    text_columns = data.get("text_columns") or [0]
    seq2seq = data.get("objective") == "seq2seq"
    source, target = args.source_column, args.target_column
    if source is None:
        source = data.get("source_column", 0) if seq2seq else 0
    if target is None:
        target = data.get("target_column", 1) if seq2seq else 1
    new_tokens = args.max_new_tokens
    if new_tokens is None:
        new_tokens = (data.get("target_seq_len") or data.get("seq_len")) if seq2seq else 64
    return {
        "max_new_tokens": new_tokens,
        "max_source_tokens": data.get("seq_len") if seq2seq else None,
        "source_column": source,
        "target_column": target,
        "add_bos": add_bos,
        "label_column": data.get("label_column", 1),
        "text_column": text_columns[0],
        "seq_len": data.get("seq_len"),
    }


def _strategy(args: argparse.Namespace) -> Any:
    from llm_jax.sample.cli import _strategy as make
    from llm_jax.sample.cli import _strategy_name

    if args.strategy is None and args.num_beams is None and args.temperature is None:
        if args.top_k is None and args.top_p is None and args.length_penalty is None:
            return None  # the task's default (beam for encoder-decoders, else greedy)
    name = _strategy_name(args)
    strategy = make(name, args)
    if name == "beam":
        import dataclasses

        strategy = dataclasses.replace(strategy, num_return_sequences=1)
    return strategy


def format_table(result: dict[str, Any]) -> str:
    """The scalar metrics as an aligned two-column table."""
    rows = [(k, v) for k, v in result["metrics"].items() if isinstance(v, int | float)]
    rate = "examples_per_second" if "examples_per_second" in result else "windows_per_second"
    rows += [(rate.replace("_per_second", "/s"), result[rate])]
    rows += [("tokens/s", result["tokens_per_second"])]
    width = max(len(k) for k, _ in rows)
    data = result["data"] if "split" in result["settings"] else Path(result["data"]).name
    lines = [f"{result['task']} on {data} ({result['examples']} examples)"]
    for k, v in rows:
        if isinstance(v, bool):
            shown = str(v).lower()
        else:
            shown = f"{v:,}" if isinstance(v, int) else f"{v:.4f}"
        lines.append(f"  {k:<{width}}  {shown}")
    per_class = result["metrics"].get("per_class")
    if per_class:
        lines.append(f"  {'class':<12} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
        for name, m in per_class.items():
            lines.append(
                f"  {name[:12]:<12} {m['precision']:9.4f} {m['recall']:7.4f} {m['f1']:7.4f} "
                f"{m['support']:8d}"
            )
    if "sacrebleu" in result:
        lines.append(f"  sacrebleu: {result['sacrebleu']}")
    return "\n".join(lines)


def _sidecar(out: str | None, suffix: str) -> Path | None:
    return None if out is None else Path(out).with_suffix(suffix)


def _split_config(args: argparse.Namespace, loaded: Any) -> Any:
    """The run's data config, for --split."""
    from llm_jax.data import DataConfig

    data = loaded.run_config.get("data")
    if not data:
        raise ValueError(f"{loaded.where} records no data config; pass held-out text with --data.")
    config = DataConfig.from_dict(data)
    if not config.paths:
        from llm_jax.train.data import stdlib_corpus

        # The run trained on the default corpus (train does the same substitution).
        config = config.replace(paths=stdlib_corpus())
    return config


def _check_split(args: argparse.Namespace) -> None:
    if args.hf is not None or args.task not in ("perplexity", "generation"):
        raise ValueError(
            "--split evaluates a run on its own held-out data: use it with --checkpoint and "
            "--task perplexity (a causal-LM run) or --task generation (a seq2seq run)."
        )


def _split_perplexity(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    from llm_jax.eval.api import evaluate_split

    return evaluate_split(
        loaded.model,
        loaded.tokenizer,
        _split_config(args, loaded),
        args.split,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )


def _split_pairs(args: argparse.Namespace, loaded: Any) -> list[tuple[str, str]]:
    """The (source, reference) texts of a seq2seq run's held-out split, raw from its TSV."""
    from llm_jax.train.task_eval import translation_pairs

    config = _split_config(args, loaded)
    if config.objective != "seq2seq":
        raise ValueError(
            f"--split with --task generation reads a seq2seq run's pairs; this run's objective "
            f"is {config.objective!r}. Pass a source<TAB>reference file with --data."
        )
    sources, references = translation_pairs(config, args.split, args.limit or 2**62)
    return list(zip(sources, references, strict=True))


def _finish(args: argparse.Namespace, loaded: Any, result: dict[str, Any]) -> int:
    """Print the table and the JSON line; write --out."""
    result["model"] = loaded.what
    line = json.dumps(result, sort_keys=True)
    if args.out is not None:
        Path(args.out).write_text(line + "\n")
    print(format_table(result))
    print(line)
    return 0


def _eval(args: argparse.Namespace) -> int:
    check_task(args.task)
    if args.split is not None:
        _check_split(args)
    from llm_jax.eval.api import evaluate, read_task_data

    if args.data is not None:
        # The data file's format is checked before the model loads (and long before
        # compiling); the run's own column settings are known after loading, so this
        # checks the flags given.
        columns = {
            k: getattr(args, k)
            for k in ("source_column", "target_column")
            if getattr(args, k) is not None
        }
        read_task_data(args.task, args.data, limit=args.limit, documents=args.documents, **columns)
    strategy = _strategy(args)
    from llm_jax.convert.load import load_for_inference
    from llm_jax.models import count_params

    loaded = load_for_inference(args.checkpoint, args.hf, args.step)
    model = loaded.model
    print(
        f"loaded {loaded.what} ({model.cfg.family}, {count_params(model):,} parameters)",
        file=sys.stderr,
    )
    if args.split is not None and args.task == "perplexity":
        return _finish(args, loaded, _split_perplexity(args, loaded))
    data = args.data if args.split is None else _split_pairs(args, loaded)
    run = _settings_from_run(args, loaded)
    labels = _label_names(args, loaded) if args.task == "classification" else None
    hypotheses = _sidecar(args.out, ".hypotheses.txt") if args.task == "generation" else None
    result = evaluate(
        model,
        loaded.tokenizer,
        args.task,
        data,
        batch_size=args.batch_size,
        limit=args.limit,
        add_bos=run["add_bos"],
        max_length=args.max_length,
        stride=args.stride,
        documents=args.documents,
        template=args.template,
        shots=args.shots,
        seed=args.seed,
        fewshot_data=args.fewshot_data,
        strategy=strategy,
        max_new_tokens=run["max_new_tokens"],
        max_source_tokens=run["max_source_tokens"],
        labels=labels,
        seq_len=args.seq_len or run["seq_len"],
        label_column=run["label_column"],
        text_column=run["text_column"],
        source_column=run["source_column"],
        target_column=run["target_column"],
        hypotheses_path=hypotheses,
        progress=not args.quiet,
    )
    if hypotheses is not None:
        result["hypotheses"] = str(hypotheses)
    if args.task == "classification" and args.out is not None:
        from llm_jax.eval.tasks import plot_confusion

        png = _sidecar(args.out, ".confusion.png")
        plot_confusion(result["metrics"]["confusion"], result["metrics"]["labels"], png)
        result["confusion_png"] = str(png)
    return _finish(args, loaded, result)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model: perplexity, classification, generation, multiple choice, cloze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="DIR", help="a training run or checkpoint")
    source.add_argument("--hf", metavar="DIR", help="a Hugging Face model folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="FILE", help="the task's data file")
    data.add_argument(
        "--split",
        choices=("validation", "test"),
        help="perplexity of a causal-LM run on its own held-out split (with --checkpoint)",
    )
    p.add_argument("--out", metavar="FILE", help="also write the result JSON here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("perplexity")
    g.add_argument("--max-length", type=int, default=None, help="window (default: model's)")
    g.add_argument("--stride", type=int, default=None, help="window step (default: half)")
    g.add_argument("--documents", choices=("file", "lines"), default="file")
    bos = g.add_mutually_exclusive_group()
    bos.add_argument(
        "--add-bos",
        dest="add_bos",
        action="store_true",
        default=None,
        help="start prompts with BOS (default: as the run trained; HF: no)",
    )
    bos.add_argument("--no-add-bos", dest="add_bos", action="store_false")
    g = p.add_argument_group("multiple_choice / sentiment")
    g.add_argument("--template", default=None, help='e.g. "Q: {context}\\nA: {choice}"')
    g.add_argument("--shots", type=int, default=0, help="few-shot examples per item")
    g.add_argument("--seed", type=int, default=1234, help="few-shot draw / sampling seed")
    g.add_argument(
        "--fewshot-data",
        metavar="FILE",
        default=None,
        help="draw shots from this file (default: the evaluated file, never the item)",
    )
    g = p.add_argument_group("classification")
    g.add_argument("--labels", default=None, help="class names in head order, comma-separated")
    g.add_argument("--seq-len", type=int, default=None, help="row length (default: the run's)")
    g = p.add_argument_group("generation")
    g.add_argument(
        "--strategy",
        choices=("greedy", "sample", "beam"),
        default=None,
        help="default: beam for encoder-decoders, greedy otherwise",
    )
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument("--length-penalty", type=float, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: a seq2seq run's target length, else 64",
    )
    g.add_argument(
        "--source-column", type=int, default=None, help="0-based (default: the run's, else 0)"
    )
    g.add_argument(
        "--target-column", type=int, default=None, help="0-based (default: the run's, else 1)"
    )
    p.set_defaults(func=_eval)
