"""How far a checkpoint's float weights are from a 4-bit grid: the double-quantization
check for weights converted from an already quantized file (e.g. a GGUF in Q4_1).

    python benchmarks/quant_grid.py CHECKPOINT [--block 32]

For every dense kernel (input axis first, [I, O]) and the token embedding ([E, V], its
rows' inputs), each output's inputs are cut into blocks of --block consecutive values
(llama.cpp's Q4_0/Q4_1/Q8_0 block along the input dimension) and the table prints, per
tensor, the share of blocks with at most 16 distinct values (exactly on some 4-bit grid),
the median number of distinct values, and the share whose values are on their block's
affine grid min + k (max - min) / 15 (Q4_1's) to 1e-3 of a step, and the share on the
symmetric grid k max|w| / 127 (Q8_0's) to 1e-2 of a step. Weights trained in
float have ~block distinct values per block and almost never sit on such a grid.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
from flax import nnx

import llm_jax as lj
from llm_jax.models.layers import Einsum, num_inputs


def block_stats(w: np.ndarray, block: int) -> tuple[float, float, float, float]:
    """(share of blocks with <= 16 distinct values, median distinct, share on Q4_1's grid,
    share on Q8_0's grid) of w [I, O] in blocks of `block` inputs per output."""
    i, o = w.shape
    blocks = w[: i // block * block].reshape(i // block, block, o).transpose(0, 2, 1)
    blocks = blocks.reshape(-1, block)  # [I / block * O, block]
    ordered = np.sort(blocks, axis=1)
    distinct = 1 + np.sum(np.diff(ordered, axis=1) != 0, axis=1)
    low, high = blocks.min(1, keepdims=True), blocks.max(1, keepdims=True)
    step = np.where(high > low, (high - low) / 15, 1.0)
    k = (blocks - low) / step
    on_grid = np.all(np.abs(k - np.round(k)) < 1e-3, axis=1)
    amax = np.abs(blocks).max(1, keepdims=True)
    k8 = blocks / np.where(amax > 0, amax / 127, 1.0)
    on_q8 = np.all(np.abs(k8 - np.round(k8)) < 1e-2, axis=1)
    shares = distinct <= 16, on_grid, on_q8
    return (
        float(np.mean(shares[0])),
        float(np.median(distinct)),
        *map(float, map(np.mean, shares[1:])),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--block", type=int, default=32)
    args = parser.parse_args(argv)
    model = lj.convert.restore_model(args.checkpoint).model
    print(f"model: {args.checkpoint}; blocks of {args.block} consecutive inputs per output")
    columns = ("<=16 values", "median", "Q4_1 grid", "Q8_0 grid")
    header = f"{'tensor':<34} {'blocks':>9} " + " ".join(f"{c:>11}" for c in columns)
    print(header + "\n" + "-" * len(header))
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Einsum):
            kernel = np.asarray(node.kernel[...], np.float32)  # [L..., in..., out...]
            lead = kernel.ndim - len(node.kernel_shape)
            i = int(np.prod(node.kernel_shape[: num_inputs(node.equation)]))
            mats = kernel.reshape(-1, i, int(np.prod(node.kernel_shape)) // i)
        elif path == ("embed",):
            mats = np.asarray(node.embedding[...], np.float32).T[None]  # [1, E, V]
            lead = 0
        else:
            continue
        stats = np.array([block_stats(m, args.block) for m in mats]).mean(0)
        name = "/".join(map(str, path)) + (f" (x{mats.shape[0]})" if lead else "")
        n = mats.shape[0] * (mats.shape[1] // args.block) * mats.shape[2]
        shares = " ".join(
            f"{v:>11.1f}" if c == "median" else f"{v:>11.1%}"
            for c, v in zip(columns, stats, strict=True)
        )
        print(f"{name:<34} {n:>9,} {shares}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
