"""The data side of a training run: corpus default, tokenizer placement, iterators."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llm_jax.data import DataConfig, Tokenizer, build_tokenizer, make_iterator
from llm_jax.data.iterator import DataIterator, load_source
from llm_jax.data.tokenize import tokenize_corpus


def stdlib_corpus() -> tuple[str, ...]:
    """The Python standard library's top-level source files of the running interpreter:
    real text on every machine, used when a config gives no `data.paths`."""
    root = Path(os.__file__).resolve().parent
    files = tuple(str(p) for p in sorted(root.glob("*.py")))
    if not files:
        raise ValueError(
            f"found no standard-library sources under {root}; set data.paths to your corpus."
        )
    return files


@dataclasses.dataclass
class PreparedData:
    """A run's resolved data config, its tokenizer, and iterator factories."""

    config: DataConfig
    tokenizer: Tokenizer
    tokenizer_dir: Path
    _eval: DataIterator | None = None
    # Where the validation iterator starts, so every evaluation sees the same batches.
    _eval_start: dict[str, Any] | None = dataclasses.field(default=None, init=False, repr=False)

    def train_iterator(self, mesh: Mesh) -> DataIterator:
        return make_iterator(self.config, self.tokenizer, split="train", mesh=mesh)

    def eval_batches(self, mesh: Mesh, max_batches: int) -> list[dict[str, Any]]:
        """Up to `max_batches` validation batches, the same ones at every evaluation."""
        if not self.config.has_validation:
            return []
        if self._eval is None:
            self._eval = make_iterator(self.config, self.tokenizer, split="validation", mesh=mesh)
            self._eval_start = self._eval.get_state()
        self._eval.set_state(self._eval_start)
        batches = []
        for batch in self._eval:
            batches.append(batch)
            if len(batches) == max_batches:
                break
        return batches


def _copy_base_tokenizer(src: Path, dst: Path) -> None:
    """The base model's tokenizer files (only those: an HF folder also holds the weights),
    copied into the run so that it and its checkpoints carry their own tokenizer."""
    from llm_jax.convert.tokenizer import save_hf_tokenizer

    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if (src / "config.json").is_file():
        save_hf_tokenizer(src, tmp)  # a Hugging Face model folder's tokenizer files
    else:
        shutil.copytree(src, tmp)  # a checkpoint's tokenizer folder
    tmp.rename(dst)


def prepare(
    config: DataConfig, workdir: str | os.PathLike, *, base_tokenizer: Path | None = None
) -> PreparedData:
    """Resolve the corpus and the tokenizer (trained once into `workdir/tokenizer` unless
    `data.tokenizer_path` names one; a fine-tuning run copies its base model's tokenizer
    there), reading and validating the data (the held-out splits' labels too) before
    compiling."""
    if not config.paths:
        print(
            "data.paths not set: training on the Python standard library's sources", file=sys.stderr
        )
        config = config.replace(paths=stdlib_corpus())
    if base_tokenizer is not None and not config.tokenizer_path and jax.process_index() == 0:
        _copy_base_tokenizer(Path(base_tokenizer), Path(workdir) / "tokenizer")
    tokenizer_dir = Path(config.tokenizer_path or Path(workdir) / "tokenizer")
    config = config.replace(tokenizer_path=str(tokenizer_dir))
    if jax.process_index() == 0:
        tokenizer = build_tokenizer(config)
    if jax.process_count() > 1:
        # One process trains and saves the tokenizer; the others load that same file.
        multihost_utils.sync_global_devices("llm_jax tokenizer ready")
        if jax.process_index() != 0:
            tokenizer = build_tokenizer(config)
    # Read the held-out splits now, so bad data (a label unseen in training) fails before
    # compiling rather than at the first evaluation.
    if config.test_paths:
        load_source(config, tokenizer, split="test")
    if config.objective == "classification" and config.has_validation:
        load_source(config, tokenizer, split="validation")
    return PreparedData(config=config, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)


def labels(data: PreparedData) -> list[str] | None:
    """The class labels in id order (`data.label_names`, else the training corpus's sorted
    labels) for classification; the label words of text-to-text (seq2seq from fastText);
    None otherwise."""
    cfg = data.config
    if cfg.objective == "seq2seq" and cfg.format == "fasttext":
        return list(cfg.label_words or cfg.label_names or ()) or None
    if cfg.objective != "classification":
        return None
    if cfg.label_names:
        return list(cfg.label_names)
    return list(tokenize_corpus(cfg, data.tokenizer, cfg.paths).meta["label_values"])
