"""Train / validation splits: which corpus each split reads and which of its examples it keeps.

Validation is `DataConfig.validation_paths` if given (a separate corpus), else
`validation_fraction` of the training corpus's units (documents or row-sized chunks of them,
sentence pairs, labelled texts) picked by a permutation seeded with `split_seed`, which is
kept apart from the shuffle seed so that reshuffling never moves the split, or, with
`validation_split="last"`, the corpus's last units (a fixed contiguous range). Test is
always a separate corpus, `DataConfig.test_paths`, read whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from llm_jax.data.config import DataConfig

SPLITS = ("train", "validation", "test")


def split_indices(
    n: int, fraction: float, seed: int, split: str, unit: str = "examples", how: str = "random"
) -> np.ndarray:
    """Sorted indices of `split` when round(n * fraction) of n items are held out for
    validation: by a permutation seeded with `seed` (independent of the shuffle seed) when
    `how` is "random", the last round(n * fraction) items when it is "last"."""
    n_val = round(n * fraction)
    if not 0 < n_val < n:
        raise ValueError(
            f"DataConfig.validation_fraction={fraction} of {n} {unit} leaves "
            f"{n_val} for validation and {n - n_val} for training; choose a fraction that "
            "keeps both non-empty, or give validation_paths."
        )
    if how == "last":
        return np.arange(n - n_val, n) if split == "validation" else np.arange(n - n_val)
    perm = np.random.default_rng(seed).permutation(n)
    chosen = perm[:n_val] if split == "validation" else perm[n_val:]
    return np.sort(chosen)


def split_corpus(config: DataConfig, split: str) -> tuple[tuple[str, ...], str, float]:
    """Where `split` comes from.

    Returns:
        (paths, the config field naming them, the fraction of that corpus held out for
        validation: 0 when validation (or test) is a separate corpus or there is none).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}.")
    if split == "validation" and not config.has_validation:
        raise ValueError(
            "no validation data: set DataConfig.validation_fraction (e.g. 0.05) or "
            "DataConfig.validation_paths."
        )
    if split == "test":
        if not config.test_paths:
            raise ValueError("no test data: set DataConfig.test_paths to a held-out corpus.")
        return config.test_paths, "DataConfig.test_paths", 0.0
    fraction = 0.0 if config.validation_paths else config.validation_fraction
    if split == "validation" and config.validation_paths:
        return config.validation_paths, "DataConfig.validation_paths", fraction
    return config.paths, "DataConfig.paths", fraction
