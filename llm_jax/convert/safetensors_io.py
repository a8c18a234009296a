"""Reading and writing Hugging Face weight files with safetensors' NumPy API.

Only `model.safetensors` and sharded `model.safetensors.index.json` folders are read: no
torch, no pickle (`pytorch_model.bin` is refused with the command that converts it), no
network. bfloat16 tensors load through `ml_dtypes` (a JAX dependency), which NumPy needs to
understand the dtype name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors' NumPy API)
import numpy as np

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5")


def read_hf_weights(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face model folder, by its state-dict key.

    Args:
      path: a folder holding `model.safetensors`, or `model.safetensors.index.json` and
        the shards it names.

    Returns:
      key -> NumPy array in the stored dtype (float32, float16, bfloat16, int64, ...).

    Raises:
      FileNotFoundError: no safetensors weights in the folder (a pickle checkpoint is named
        with the way to convert it), or a shard named by the index is missing.
      ValueError: a key appears in two shards.
    """
    from safetensors import safe_open

    root = Path(path)
    if (root / INDEX_NAME).is_file():
        index = json.loads((root / INDEX_NAME).read_text())
        shards = sorted(set(index["weight_map"].values()))
    elif (root / WEIGHTS_NAME).is_file():
        shards = [WEIGHTS_NAME]
    else:
        pickles = [n for n in _PICKLE_NAMES if (root / n).exists()]
        hint = (
            f" It has {pickles}: pickle checkpoints are not read (they can run code); "
            "convert them with transformers: "
            "`AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
            if pickles
            else ""
        )
        raise FileNotFoundError(f"{str(root)!r} has no {WEIGHTS_NAME} or {INDEX_NAME}.{hint}")
    out: dict[str, np.ndarray] = {}
    for shard in shards:
        file = root / shard
        if not file.is_file():
            raise FileNotFoundError(
                f"{INDEX_NAME} in {str(root)!r} names {shard}, which is missing."
            )
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                if key in out:
                    raise ValueError(f"tensor {key!r} appears in two shards of {str(root)!r}.")
                out[key] = f.get_tensor(key)
    return out


def write_safetensors(
    tensors: dict[str, np.ndarray],
    path: str | os.PathLike,
    *,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `tensors` as one safetensors file with the metadata transformers expects
    (plus `metadata`, string to string)."""
    from safetensors.numpy import save_file

    path = Path(path)
    contiguous = {k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}
    save_file(contiguous, str(path), metadata={**(metadata or {}), "format": "pt"})
    # safetensors writes through a private temporary file (mode 0600); a model folder is
    # meant to be shared like the config.json beside it, so apply the umask as open() does.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
    return path
