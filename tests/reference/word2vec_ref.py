"""Float64 NumPy twin of one batched Word2Vec SGD step, written from word2vec.c's loops.

word2vec.c updates after each example; a batched step computes every example's update from
the tables as they were before the step and adds them all (what `_update` does). The twin
follows the C code's per-example arithmetic (neu1e, g = (label - σ(f)) * alpha) with that
one difference, and is independent of the JAX code.
"""

from __future__ import annotations

import math

import numpy as np


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def sgd_step_ref(w_in, w_out, inp, inp_mask, outs, labels, weights, alpha):
    """One step over P examples; returns the new (w_in, w_out) in float64.

    Args:
      w_in: [V, D] input vectors; w_out: [R, D] output rows (syn1neg or syn1).
      inp, inp_mask: [P, C] context rows of each example and 1/0 (skip-gram: C = 1).
      outs, labels, weights: [P, K] output rows, their labels (ns: 1 then 0s; hs: 1 - code)
        and 1/0 weights (a negative equal to the true word, path padding).
      alpha: the learning rate.
    """
    w_in0, w_out0 = np.asarray(w_in, np.float64), np.asarray(w_out, np.float64)
    new_in, new_out = w_in0.copy(), w_out0.copy()
    for p in range(len(inp)):
        ctx = [int(c) for c, m in zip(inp[p], inp_mask[p], strict=True) if m]
        if not ctx:
            continue
        h = sum(w_in0[c] for c in ctx) / len(ctx)
        neu1e = np.zeros_like(h)
        for row, label, weight in zip(outs[p], labels[p], weights[p], strict=True):
            if not weight:
                continue
            f = math.fsum(float(a) * float(b) for a, b in zip(h, w_out0[row], strict=True))
            g = (label - _sigmoid(f)) * alpha
            neu1e += g * w_out0[row]
            new_out[row] += g * h
        for c in ctx:  # every context row gets the whole neu1e (cbow_mean in gensim)
            new_in[c] += neu1e
    return new_in, new_out
