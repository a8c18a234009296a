"""Packed, sharded, resumable batches of one split: the iterator the trainer reads.

    tokenize (cached) → split train/validation → objective's source (pack into rows)
    → seeded shuffle (grain) → batch (global B) → this host's slice of the batch
    → objective's builder → `jax.make_array_from_process_local_data` onto the mesh's data axes

The trainer's entry points:

    tok = build_tokenizer(cfg)                       # load cfg.tokenizer_path, or train + save
    train = make_iterator(cfg, tok, split="train", mesh=mesh)        # infinite, shuffled
    val = make_iterator(cfg, tok, split="validation", mesh=mesh)     # one pass, padded
    batch = next(train)                              # dict of global jax.Arrays [B, ...]
    state = train.get_state()                        # small JSON-able dict for the checkpoint
    train.set_state(state)                           # continue with exactly the next batch

Every host computes the same global order (a pure function of the seed), then builds only
its own rows of each global batch, so batches do not depend on the number of hosts and a
checkpoint restores onto any host count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llm_jax.data.config import DataConfig
from llm_jax.data.objectives import Source, Split, objective_spec
from llm_jax.data.splits import split_corpus
from llm_jax.data.tokenize import tokenize_corpus
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.parallel.mesh import BATCH_AXES, batch_sharding, check_batch_size

_STATE_VERSION = 1


def load_source(config: DataConfig, tokenizer: Tokenizer, split: str = "train") -> Source:
    """The examples of one split ("train", "validation" or "test") of `config`'s corpus, built by
    `config.objective`'s source (see `splits` for which examples each split holds)."""
    paths, what, fraction = split_corpus(config, split)
    corpus = tokenize_corpus(config, tokenizer, paths, what)

    def train_corpus():
        if paths == config.paths:
            return corpus
        return tokenize_corpus(config, tokenizer, config.paths)

    inputs = Split(config, tokenizer, corpus, split, what, fraction, train_corpus)
    return objective_spec(config.objective).source(inputs)


def host_slice(
    batch_size: int, process_index: int, process_count: int, sharding: NamedSharding | None = None
) -> slice:
    """Rows of the global batch this host builds.

    Without a sharding: the process_index-th of process_count equal contiguous blocks. With
    one: exactly the rows this process's devices hold (what
    `make_array_from_process_local_data` expects), which is the same block for the usual
    process-major device order and stays correct when hosts share (replicate) rows.
    """
    if sharding is None:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
        if batch_size % process_count:
            check_batch_size(batch_size, None, process_count=process_count)
        n = batch_size // process_count
        return slice(process_index * n, (process_index + 1) * n)
    index_map = sharding.addressable_devices_indices_map((batch_size,))
    spans = sorted(
        {
            (s[0].start or 0, batch_size if s[0].stop is None else s[0].stop)
            for s in index_map.values()
        }
    )
    lo, hi = spans[0][0], max(h for _, h in spans)
    covered = sum(h - l for l, h in spans)
    if covered != hi - lo:
        raise ValueError(
            "this host's devices hold non-contiguous rows of the batch; build the mesh with "
            "jax.make_mesh (process-major device order)."
        )
    return slice(lo, hi)


# Iterator -------------------------------------------------------------------------------------


class DataIterator:
    """Deterministic, resumable iterator over global batches of one split, built on grain.

    The order is `grain.MapDataset.range(N).shuffle(seed).batch(B).repeat(epochs)`: a lazy
    seeded permutation, reseeded every epoch, batched within the epoch. Batch k is a pure
    function of (seed, k), so the state is just k plus what checks that it still applies.

    Attributes:
        source: the split's examples.
        steps_per_epoch: batches per pass over the split.
        order: the grain MapDataset of global example ids per step.
        dataset: the grain MapDataset of this host's numpy batches (random access by step).
    """

    def __init__(
        self,
        source: Source,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        mesh: Mesh | None = None,
        data_axes: Sequence[str] = BATCH_AXES,
        process_index: int | None = None,
        process_count: int | None = None,
        num_workers: int = 0,
        prefetch: int = 2,
        split: str = "train",
    ) -> None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        check_batch_size(batch_size, mesh, data_axes, process_count)
        self.sharding = None if mesh is None else batch_sharding(mesh, data_axes=data_axes)
        self.rows = host_slice(batch_size, process_index, process_count, self.sharding)
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.split, self.num_epochs = split, num_epochs
        n = source.num_examples
        self.steps_per_epoch = n // batch_size if drop_remainder else -(-n // batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the {split} split has {n} example(s) (packed rows / pairs) but "
                f"DataConfig.batch_size={batch_size}; lower batch_size or seq_len, or add data."
            )
        ds = grain.MapDataset.range(n)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if num_epochs != 1:
            ds = ds.repeat(num_epochs)
        self.order = ds  # global example ids [B] of each step
        self.dataset = ds.map_with_index(self._local_batch)
        self._read = grain.ReadOptions(
            num_threads=num_workers, prefetch_buffer_size=prefetch if num_workers else 0
        )
        self._it = iter(self.dataset.to_iter_dataset(self._read))

    def _local_batch(self, step: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices, np.int64)
        if len(indices) < self.batch_size:  # the last validation batch: pad with empty rows
            indices = np.concatenate([indices, np.full(self.batch_size - len(indices), -1)])
        return self.source.build(indices[self.rows], step // self.steps_per_epoch)

    def example_indices(self, step: int) -> np.ndarray:
        """int64 [<= B]: the split's example ids in global batch `step` (all hosts)."""
        return np.asarray(self.order[step], np.int64)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's numpy rows of global batch `step` (no iterator state involved)."""
        return self.dataset[step]

    @property
    def element_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shape, dtype (and sharding, with a mesh) of each batch entry."""
        return {
            k: jax.ShapeDtypeStruct((self.batch_size, *s), d, sharding=self.sharding)
            for k, (s, d) in self.source.row_spec().items()
        }

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        local = next(self._it)
        if self.sharding is None:
            return local
        return {
            k: jax.make_array_from_process_local_data(
                self.sharding, v, (self.batch_size, *v.shape[1:])
            )
            for k, v in local.items()
        }

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an infinite (training) iterator has no len().")
        return self.steps_per_epoch * self.num_epochs

    def get_state(self) -> dict[str, Any]:
        """JSON-able position: the next step, its epoch and offset, and the order's identity."""
        step = int(self._it.get_state()["next_index"])
        return {
            "version": _STATE_VERSION,
            "split": self.split,
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "position": step % self.steps_per_epoch,
            "seed": self.seed,
            "num_examples": self.source.num_examples,
            "batch_size": self.batch_size,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from `state` (from `get_state`): the next batch is the one that followed.

        Raises ValueError if the state belongs to a different order (seed, data, batch size),
        since resuming it would silently repeat or skip data.
        """
        mine = self.get_state()
        for key in ("version", "split", "seed", "num_examples", "batch_size"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"data iterator state has {key}={state.get(key)!r} but this iterator has "
                    f"{mine[key]!r}; restore with the DataConfig (and corpus) the checkpoint "
                    "was written with."
                )
        self._it.set_state({"next_index": int(state["step"])})


def make_iterator(
    config: DataConfig,
    tokenizer: Tokenizer,
    *,
    split: str = "train",
    mesh: Mesh | None = None,
    data_axes: Sequence[str] = BATCH_AXES,
    process_index: int | None = None,
    process_count: int | None = None,
) -> DataIterator:
    """Batches of one split of `config`'s corpus.

    "train" is infinite and shuffled (`shuffle_seed`), dropping each epoch's last partial
    batch; "validation" is one ordered pass whose last batch is padded with empty rows
    (segment ids 0, weights 0). With a `mesh`, batches are global `jax.Array`s sharded as
    `batch_sharding(mesh, data_axes)`; without one, this host's numpy rows.

    Args:
        process_index, process_count: default to jax's; pass them to simulate hosts.
    """
    if mesh is not None:
        check_batch_size(
            config.batch_size,
            mesh,
            data_axes,
            jax.process_count() if process_count is None else process_count,
        )
    source = load_source(config, tokenizer, split)
    train = split == "train"
    return DataIterator(
        source,
        config.batch_size,
        shuffle=config.shuffle and train,
        seed=config.shuffle_seed,
        num_epochs=None if train else 1,
        drop_remainder=train,
        mesh=mesh,
        data_axes=data_axes,
        process_index=process_index,
        process_count=process_count,
        num_workers=config.num_workers,
        prefetch=config.prefetch,
        split=split,
    )
