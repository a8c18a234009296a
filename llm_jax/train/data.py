"""The data side of a training run: corpus default, tokenizer placement, iterators."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llm_jax.data import DataConfig, Tokenizer, build_tokenizer, load_tokenizer, make_iterator
from llm_jax.data.iterator import DataIterator, load_source


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


def prepare(config: DataConfig, workdir: str | os.PathLike) -> PreparedData:
    """Resolve the corpus and the tokenizer (trained once into `workdir/tokenizer` unless
    `data.tokenizer_path` names one), reading and validating the data (the test split's
    too) before compiling."""
    if not config.paths:
        print(
            "data.paths not set: training on the Python standard library's sources", file=sys.stderr
        )
        config = config.replace(paths=stdlib_corpus())
    tokenizer_dir = Path(config.tokenizer_path or Path(workdir) / "tokenizer")
    config = config.replace(tokenizer_path=str(tokenizer_dir))
    if jax.process_index() == 0:
        tokenizer = build_tokenizer(config)
    if jax.process_count() > 1:
        # One process trains and saves the tokenizer; the others load that same file.
        multihost_utils.sync_global_devices("llm_jax tokenizer ready")
        if jax.process_index() != 0:
            tokenizer = load_tokenizer(tokenizer_dir, num_sentinels=config.num_sentinels)
    if config.test_paths:  # read now, so bad test data (an unseen label) fails before compiling
        load_source(config, tokenizer, split="test")
    return PreparedData(config=config, tokenizer=tokenizer, tokenizer_dir=tokenizer_dir)
