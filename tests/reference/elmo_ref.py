"""Float64 NumPy twins of ELMo's ops (`llm_jax.ops.lstm`), written from the published
formulas (Hochreiter & Schmidhuber 1997 with forget gates; AllenNLP's
LstmCellWithProjection; Kim et al. 2016 char CNN; Srivastava et al. 2015 highway).

Deliberately naive: one example and one time step at a time, explicit windows, `math`
per element. Do not "simplify" them into a translation of the JAX code.

Shape letters: B batch, T words, W characters, E char embedding, F filters, D input,
C cells, P projection.
"""

from __future__ import annotations

import math

import numpy as np


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def lstm_cell_ref(x, h, c, w_x, w_h, b, w_p=None, cell_clip=None, proj_clip=None):
    """One step for each example: gates i, f, g, o (in that order, each C wide) from
    x w_x + h w_h + b; c' = i g + f c (clipped); h' = o tanh(c'), projected and clipped.

    Args: x [B, D], h [B, P], c [B, C], w_x [D, 4C], w_h [P, 4C], b [4C], w_p [C, P].
    Returns: (h' [B, P], c' [B, C]) float64.
    """
    x, h, c, w_x, w_h, b = (np.asarray(a, np.float64) for a in (x, h, c, w_x, w_h, b))
    cells = c.shape[1]
    hs, cs = [], []
    for n in range(x.shape[0]):
        z = x[n] @ w_x + h[n] @ w_h + b
        new_c = np.empty(cells)
        out = np.empty(cells)
        for j in range(cells):
            i = _sigmoid(z[j])
            f = _sigmoid(z[cells + j])
            g = math.tanh(z[2 * cells + j])
            o = _sigmoid(z[3 * cells + j])
            v = i * g + f * c[n, j]
            if cell_clip is not None:
                v = min(max(v, -cell_clip), cell_clip)
            new_c[j] = v
            out[j] = o * math.tanh(v)
        if w_p is not None:
            out = out @ np.asarray(w_p, np.float64)
            if proj_clip is not None:
                out = np.clip(out, -proj_clip, proj_clip)
        hs.append(out)
        cs.append(new_c)
    return np.stack(hs), np.stack(cs)


def lstm_layer_ref(x, mask, w_x, w_h, b, w_p=None, cell_clip=None, proj_clip=None, reverse=False):
    """Each row read over its real positions only (in order, or reversed), from zero state;
    padded positions output zeros.

    Args: x [B, T, D], mask [B, T] bool, weights as `lstm_cell_ref`.
    Returns: [B, T, P] float64.
    """
    x = np.asarray(x, np.float64)
    cells = np.asarray(b).shape[0] // 4
    proj = cells if w_p is None else np.asarray(w_p).shape[1]
    out = np.zeros((*x.shape[:2], proj))
    for n in range(x.shape[0]):
        h, c = np.zeros((1, proj)), np.zeros((1, cells))
        real = [t for t in range(x.shape[1]) if mask[n, t]]
        for t in reversed(real) if reverse else real:
            h, c = lstm_cell_ref(x[n, t][None], h, c, w_x, w_h, b, w_p, cell_clip, proj_clip)
            out[n, t] = h[0]
    return out


def char_cnn_ref(chars, kernels, biases, activation="relu"):
    """For each word and filter: max over the valid windows of sum_{j, e} k[j, e, f]
    chars[w + j, e], plus the bias, through the activation; filters concatenated.

    Args: chars [B, T, W, E], kernels: [K, E, F_k] each, biases: [F_k] each.
    Returns: [B, T, sum F_k] float64.
    """
    chars = np.asarray(chars, np.float64)
    act = (lambda v: max(v, 0.0)) if activation == "relu" else math.tanh
    b_, t_, w_, _ = chars.shape
    feats = []
    for kernel, bias in zip(kernels, biases, strict=True):
        kernel, bias = np.asarray(kernel, np.float64), np.asarray(bias, np.float64)
        k, _, f = kernel.shape
        out = np.empty((b_, t_, f))
        for i in range(b_):
            for t in range(t_):
                for g in range(f):
                    windows = [
                        float(np.sum(chars[i, t, s : s + k, :] * kernel[:, :, g]))
                        for s in range(w_ - k + 1)
                    ]
                    out[i, t, g] = act(max(windows) + bias[g])
        feats.append(out)
    return np.concatenate(feats, axis=-1)


def highway_ref(x, w, b):
    """x <- g x + (1 - g) relu(n), [n, g_pre] = x w_l + b_l, g = sigmoid(g_pre), per layer.

    Args: x [B, T, D], w [N, D, 2D], b [N, 2D].
    Returns: [B, T, D] float64.
    """
    x = np.asarray(x, np.float64).copy()
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    d = x.shape[-1]
    for layer in range(w.shape[0]):
        new = np.empty_like(x)
        for idx in np.ndindex(*x.shape[:-1]):
            z = x[idx] @ w[layer] + b[layer]
            for j in range(d):
                g = _sigmoid(z[d + j])
                new[(*idx, j)] = g * x[(*idx, j)] + (1 - g) * max(z[j], 0.0)
        x = new
    return x


def scalar_mix_ref(layers, weights, gamma):
    """gamma * sum_l (exp(s_l) / sum_k exp(s_k)) layers_l.

    Args: layers [L, ...], weights [L], gamma scalar.
    """
    layers = np.asarray(layers, np.float64)
    e = [math.exp(float(s)) for s in weights]
    return float(gamma) * sum(e[i] / sum(e) * layers[i] for i in range(len(e)))
