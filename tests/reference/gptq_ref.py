"""Float64 NumPy twin of GPTQ's core (`llm_jax.compress.gptq.gptq_kernel`), written from
the paper's Algorithm 1 without its lazy-batch blocking.

Kernel w [I, O] (input axis first), Hessian h = X^T X [I, I]. Dead inputs (h_ii = 0) get
h_ii = 1 and zero weights; h += 0.01 mean(diag h) I; U = the upper Cholesky factor of
h^-1. Inputs are quantized in order: at a group's first input its scale is max|w| / qmax
over the group's (already updated) weights; q_i = clip(round(w_i / s), -qmax, qmax);
e = (w_i - q_i s) / U_ii; every later input j gets w_j -= U_ij e.
"""

from __future__ import annotations

import numpy as np

QMAX = {8: 127, 4: 7}


def gptq(
    w: np.ndarray, h: np.ndarray, bits: int, group_size: int = 0, percdamp: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """(q [I, O] integer codes as float64, scale [G, O] float64)."""
    w = np.array(w, np.float64)
    h = np.array(h, np.float64)
    i_total, o = w.shape
    size = i_total if group_size == 0 else group_size
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += percdamp * np.mean(np.diag(h)) * np.eye(i_total)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros((i_total, o))
    scale = np.ones((i_total // size, o))
    qmax = QMAX[bits]
    for i in range(i_total):
        g = i // size
        if i % size == 0:
            amax = np.max(np.abs(w[i : i + size]), axis=0)
            scale[g] = np.where(amax > 0, amax / qmax, 1.0)
        q[i] = np.clip(np.round(w[i] / scale[g]), -qmax, qmax)
        err = (w[i] - q[i] * scale[g]) / u[i, i]
        w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
    return q, scale
