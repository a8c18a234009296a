"""Task metrics during and at the end of a run: classification scores, held-out test, BLEU/chrF.

Classification: one jitted step per eval batch returns the loss's (sum, count) and a [C, C]
confusion count (rows: true label, columns: argmax of the model's `classify` logits; rows
whose `label_weights` is 0, the padding of a last batch, count nothing), summed on the host
over the batches; accuracy, macro-F1 and per-class precision / recall follow from it in
`classification_metrics`. Other objectives keep the eval step's mean losses.

Seq2seq (translation): `translate` beam-searches the source texts of a split with
`llm_jax.sample.generate`, detokenizes, and `score_translations` scores the hypotheses
against the raw reference texts with sacrebleu's BLEU and chrF. It runs at the end of a run
on the validation split (up to `train.eval_generate_examples` examples), and also at every
evaluation when `train.eval_generate` is true.

Held-out test: `final_evaluation` (called once by `train` after the last step) evaluates
`data.test_paths`, read with the run's objective and tokenizer, prints
`test: accuracy=... macro_f1=... loss=...` and writes a `"split": "test"` record.

Shape letters: B batch, C classes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from llm_jax import ops
from llm_jax.train.losses import classification_logits

if TYPE_CHECKING:
    from llm_jax.data import DataConfig, Tokenizer
    from llm_jax.train.loop import Run

HYPOTHESES_FILE = "hypotheses.txt"


# Device side ---------------------------------------------------------------------------------


def confusion_counts(
    logits: Float[Array, "B C"], labels: Int[Array, " B"], weights: Float[Array, " B"]
) -> Float[Array, "C C"]:
    """Weighted confusion counts: [i, j] = sum of `weights` over rows with label i whose
    logits' argmax is j. float32 counts are exact below 2**24 rows."""
    num_classes = logits.shape[-1]
    predicted = jnp.argmax(logits, axis=-1)
    truth = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * weights[:, None]
    # [C, C]
    return jnp.einsum("BC,BD->CD", truth, jax.nn.one_hot(predicted, num_classes))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def classification_eval_step(
    params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef
) -> dict[str, Any]:
    """One eval batch of a classifier, from one `classify` forward (no dropout).

    Returns:
      {"cls": (loss sum, count) over the rows of `label_weights` [B] (the eval step's
      loss, from the same `losses.classification_logits`), "confusion": [C, C]
      `confusion_counts`}.
    """
    logits = classification_logits(nnx.merge(graphdef, params), batch)
    labels, weights = batch["labels"], batch["label_weights"]
    return {
        "cls": ops.cross_entropy(logits, labels, weights),
        "confusion": confusion_counts(logits, labels, weights),
    }


# Host side -----------------------------------------------------------------------------------


def mean_losses(sums: Mapping[str, tuple[float, float]], main_loss: str) -> dict[str, float]:
    """{name_loss: sum / count}, plus "loss" (their total) and the perplexity of
    `main_loss` when it is present; {} for no batches."""
    out = {f"{k}_loss": s / max(c, 1.0) for k, (s, c) in sums.items()}
    main = out.get(f"{main_loss}_loss")
    if main is not None:
        out["loss"] = sum(out.values())
        out["perplexity"] = math.exp(min(main, 50.0))
    return out


def classification_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision / recall / F1 from confusion counts.

    A class's precision (recall) is 0 when it was never predicted (never true), as
    scikit-learn's `zero_division=0`; macro-F1 averages F1 over the classes that occur as a
    label or a prediction (scikit-learn's default label set), so the unused rows of an
    oversized head do not drag it down.

    Args:
      confusion: [C, C] counts, rows true label, columns prediction.

    Returns:
      {"accuracy", "macro_f1": floats; "precision", "recall", "f1": float64 [C]}.
    """
    confusion = np.asarray(confusion, np.float64)
    true_positive = np.diag(confusion)
    support, predicted = confusion.sum(1), confusion.sum(0)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(support), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(support), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(support), where=both > 0)
    present = (support > 0) | (predicted > 0)
    total = confusion.sum()
    return {
        "accuracy": float(true_positive.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


@dataclasses.dataclass
class SplitMetrics:
    """One evaluation of one split: scalars (JSONL + TensorBoard) and JSON-only fields."""

    scalars: dict[str, float] = dataclasses.field(default_factory=dict)
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    signature: str | None = None  # sacrebleu's, when BLEU/chrF were scored

    def line(self) -> str:
        """'accuracy=0.8100 macro_f1=0.8000 loss=0.4123 ...': headline metrics first."""
        first = ("accuracy", "macro_f1", "bleu", "chrf", "exact_match", "loss")
        keys = [k for k in first if k in self.scalars]
        keys += [k for k in self.scalars if k not in first and "/" not in k]
        text = " ".join(f"{_display(k)}={self.scalars[k]:.4f}" for k in keys)
        return text if self.signature is None else f"{text} (sacrebleu signature {self.signature})"


def _display(key: str) -> str:
    return {"bleu": "BLEU", "chrf": "chrF"}.get(key, key)


def _tag(name: str) -> str:
    """A label as a metric-name part: no '/', no whitespace."""
    return re.sub(r"[/\s]+", "_", name)


def label_names(config: DataConfig, tokenizer: Tokenizer, num_classes: int) -> list[str]:
    """The name of each of the head's `num_classes` ids: `data.label_names`, else the sorted
    training labels (the ids the data pipeline gives), then `class_<i>` for any rest."""
    names = config.label_names
    if names is None:
        from llm_jax.data.tokenize import tokenize_corpus

        names = tokenize_corpus(config, tokenizer, config.paths).meta["label_values"]
    names = [str(n) for n in names][:num_classes]
    return names + [f"class_{i}" for i in range(len(names), num_classes)]


def evaluate_batches(
    run: Run, params: Any, batches: Iterable[dict[str, jax.Array]], main_loss: str
) -> SplitMetrics:
    """Mean losses over `batches` (and, for classification, the task metrics). `params` are
    the state's (a fine-tuning run's trainable part; the frozen rest is added here)."""
    from llm_jax.parallel.rules import activation_sharding

    classify = run.cfg.data.objective == "classification"
    whole = run.steps.full_params(params) if classify else None
    sums: dict[str, list[float]] = {}
    confusion = None
    with activation_sharding(run.layout.mesh, run.layout.rules):
        for batch in batches:
            if classify:
                out = jax.device_get(
                    classification_eval_step(whole, batch, graphdef=run.layout.graphdef)
                )
                counts = out.pop("confusion")
                confusion = counts if confusion is None else confusion + counts
            else:
                out = jax.device_get(run.steps.eval(params, batch))
            for name, (s, c) in out.items():
                acc = sums.setdefault(name, [0.0, 0.0])
                acc[0] += float(s)
                acc[1] += float(c)
    result = SplitMetrics(scalars=mean_losses(sums, main_loss))
    if confusion is not None:
        _add_classification(run, result, confusion)
    return result


def _add_classification(run: Run, result: SplitMetrics, confusion: np.ndarray) -> None:
    m = classification_metrics(confusion)
    names = label_names(run.data.config, run.data.tokenizer, confusion.shape[0])
    result.scalars = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], **result.scalars}
    for i, name in enumerate(names):
        result.scalars[f"precision/{_tag(name)}"] = float(m["precision"][i])
        result.scalars[f"recall/{_tag(name)}"] = float(m["recall"][i])
    result.fields = {"labels": names, "confusion": np.rint(confusion).astype(int).tolist()}


# Translation ---------------------------------------------------------------------------------


def score_translations(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenization, exponential smoothing,
    character 6-grams) of detokenized `hypotheses` against one reference each.

    Returns:
      {"bleu", "chrf": floats in [0, 100], "exact_match": the share of hypotheses equal to
      their reference after stripping outer whitespace (a text-to-text classifier's
      accuracy), "signature": sacrebleu's signatures of both}.
    """
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses for {len(references)} references; score one "
            "hypothesis per reference."
        )
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": float(bleu.corpus_score(hypotheses, [references]).score),
        "chrf": float(chrf.corpus_score(hypotheses, [references]).score),
        "exact_match": float(
            np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)])
        )
        if references
        else 0.0,
        "signature": f"BLEU {bleu.get_signature()}, chrF {chrf.get_signature()}",
    }


def translation_pairs(config: DataConfig, split: str, limit: int) -> tuple[list[str], list[str]]:
    """(source texts, reference texts) of the first `limit` examples of a seq2seq `split`,
    raw from the TSV: the same rows, in the same order, as that split's iterator."""
    from llm_jax.data import corpus as corpus_lib
    from llm_jax.data.splits import split_corpus, split_indices

    paths, what, fraction = split_corpus(config, split)
    columns = [config.source_column, config.target_column]
    (sources, targets), _ = corpus_lib.read_tsv_columns(paths, columns, config.file_pattern, what)
    index = np.arange(len(sources))
    if fraction:
        index = split_indices(
            len(sources), fraction, config.split_seed, split, "pairs", config.validation_split
        )
    index = index[:limit].tolist()
    return [sources[i] for i in index], [targets[i] for i in index]


def translate(
    model: Any,
    tokenizer: Tokenizer,
    sources: list[str],
    *,
    max_source_tokens: int,
    max_new_tokens: int,
    num_beams: int,
    mesh: Any = None,
    rules: Mapping[str, Any] | None = None,
) -> list[str]:
    """Beam-search translations of `sources`, detokenized (special tokens dropped).

    Sources are encoded as in training (truncated to `max_source_tokens - 1`, then EOS). The
    batch is padded to a multiple of the mesh's data-parallel size by repeating the last
    source, whose extra outputs are dropped.
    """
    from llm_jax.parallel.mesh import data_parallel_size
    from llm_jax.sample import Beam, as_decoder, generate

    eos = tokenizer.eos_id
    prompts = [[*ids[: max_source_tokens - 1], eos] for ids in tokenizer.encode_batch(sources)]
    shards = 1 if mesh is None else data_parallel_size(mesh)
    prompts += [prompts[-1]] * (-len(prompts) % shards)
    out = generate(
        as_decoder(model, mesh=mesh, rules=rules),
        prompts,
        max_new_tokens=max_new_tokens,
        strategy=Beam(num_beams=num_beams),
        eos_id=eos,
        pad_id=tokenizer.pad_id or 0,
        mesh=mesh,
        rules=None if rules is None else dict(rules),
    )
    best = [beams[0] for beams in out.to_lists()[: len(sources)]]
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in best]


def generation_metrics(run: Run, params: Any, split: str) -> SplitMetrics:
    """Translate up to `train.eval_generate_examples` sources of `split`, write the
    hypotheses (one a line) to the workdir, and score them."""
    cfg, data = run.cfg, run.data.config
    sources, references = translation_pairs(data, split, cfg.train.eval_generate_examples)
    model = nnx.merge(run.layout.graphdef, run.steps.full_params(params))
    hypotheses = translate(
        model,
        run.data.tokenizer,
        sources,
        max_source_tokens=data.seq_len,
        max_new_tokens=data.target_seq_len or data.seq_len,
        num_beams=cfg.train.eval_beams,
        mesh=run.layout.mesh,
        rules=run.layout.rules,
    )
    if jax.process_index() == 0:
        path = hypotheses_path(run.workdir, split)
        path.write_text("".join(h.replace("\n", " ") + "\n" for h in hypotheses), "utf-8")
    scores = score_translations(hypotheses, references)
    return SplitMetrics(
        scalars={k: scores[k] for k in ("bleu", "chrf", "exact_match")},
        fields={"examples": len(hypotheses)},
        signature=scores["signature"],
    )


def hypotheses_path(workdir: Path, split: str) -> Path:
    """workdir/hypotheses.txt for validation, workdir/hypotheses.<split>.txt otherwise."""
    name = HYPOTHESES_FILE if split == "validation" else f"hypotheses.{split}.txt"
    return Path(workdir) / name


def generates(run: Run) -> bool:
    """Whether this run decodes: a seq2seq objective with eval_generate_examples > 0."""
    return run.cfg.data.objective == "seq2seq" and run.cfg.train.eval_generate_examples > 0


# Entry points of the loop ---------------------------------------------------------------------


def evaluate_validation(run: Run, params: Any, main_loss: str) -> SplitMetrics:
    """The periodic evaluation (`hooks.EvalEvery`): the eval batches' losses and task
    metrics, plus BLEU/chrF when `train.eval_generate` asks for them."""
    result = evaluate_batches(run, params, run.eval_batches(), main_loss)
    if result.scalars and generates(run) and run.cfg.train.eval_generate:
        _merge(result, generation_metrics(run, params, "validation"))
    return result


def _merge(into: SplitMetrics, other: SplitMetrics) -> None:
    into.scalars.update(other.scalars)
    into.fields.update(other.fields)
    into.signature = other.signature


def final_evaluation(run: Run, params: Any, interrupted: int | None = None) -> None:
    """After the last step: BLEU/chrF of the validation split (seq2seq, unless the periodic
    evaluation already decoded it at this step) and the test split's metrics, each printed
    and written to the JSONL with a "split" field. Nothing after an interrupted run, or
    when there was nothing to train."""
    if interrupted is not None or run.steps is None:
        return
    from llm_jax.data.objectives import objective_spec

    cfg = run.cfg
    decoded_last = cfg.train.eval_generate and cfg.train.eval_every
    if generates(run) and cfg.data.has_validation and not decoded_last:
        _report(run, "validation", "eval", generation_metrics(run, params, "validation"))
    if cfg.data.test_paths:
        from llm_jax.data import make_iterator

        test = make_iterator(cfg.data, run.data.tokenizer, split="test", mesh=run.layout.mesh)
        result = evaluate_batches(run, params, test, objective_spec(cfg.data.objective).main_loss)
        if generates(run):
            _merge(result, generation_metrics(run, params, "test"))
        _report(run, "test", "test", result)


def _report(run: Run, split: str, prefix: str, result: SplitMetrics) -> None:
    run.writer.write(
        run.step,
        {f"{prefix}/{k}": v for k, v in result.scalars.items()},
        fields={"split": split, **{f"{prefix}/{k}": v for k, v in result.fields.items()}},
    )
    message = f"{split}: {result.line()}"
    if run.progress.enabled:  # above the bar, without breaking it
        run.progress.write(message)
    elif jax.process_index() == 0:  # said even with train.progress=false
        print(message, file=sys.stdout, flush=True)
