"""Float64 NumPy twin of `llm_jax.ops.quant`, written from the scheme's definition.

A kernel [I, O] (input axis first) is cut, per output column, into groups of `group_size`
consecutive inputs (0: one group of all I); each group's scale is max|w| / qmax (qmax 127
for 8 bits, 7 for 4) and its values round(w / scale) clipped to [-qmax, qmax]. Loops over
columns and groups keep it obviously correct; int4 packing is a storage detail the twin
does not model (it returns the unpacked integer values).
"""

from __future__ import annotations

import numpy as np

QMAX = {8: 127, 4: 7}


def quantize(w: np.ndarray, bits: int, group_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(q [I, O] integers as float64, scale [G, O] float64) of a kernel w [I, O]."""
    w = np.asarray(w, np.float64)
    i, o = w.shape
    size = i if group_size == 0 else group_size
    groups = i // size
    q = np.zeros((i, o))
    scale = np.ones((groups, o))
    for c in range(o):
        for g in range(groups):
            block = w[g * size : (g + 1) * size, c]
            amax = np.max(np.abs(block))
            if amax > 0:
                scale[g, c] = amax / QMAX[bits]
            values = np.round(block / scale[g, c])
            q[g * size : (g + 1) * size, c] = np.clip(values, -QMAX[bits], QMAX[bits])
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w [I, O] = q * the scale of each entry's group."""
    size = q.shape[0] // scale.shape[0]
    return q * np.repeat(scale, size, axis=0)


def matmul(x: np.ndarray, q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """y [M, O] = x [M, I] . dequantize(q, scale) [I, O], in float64."""
    return np.asarray(x, np.float64) @ dequantize(np.asarray(q, np.float64), scale)
