"""Float64 NumPy twin of the attention gradient (the custom VJP of the masked softmax).

Shape letters as in `ops_ref.attention_ref`: B batch, T queries, S keys, N query heads,
K key/value heads, H head dim.
"""

from __future__ import annotations

import math

import numpy as np


def attention_grads_ref(q, k, v, mask, bias, cotangent):
    """(dq, dk, dv, dbias) of sum(attention(q, k, v, mask, bias) * cotangent), float64.

    With p = softmax over the visible keys of l = q.k / sqrt(H) + bias and o = p v:
    dv = p^T g, dp = g v^T, dl = p (dp - sum_s p dp), dq = dl k / sqrt(H),
    dk = dl^T q / sqrt(H), dbias = dl. Masked keys and fully masked rows get zero.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool [B, N, T, S]; bias: [B, N, T, S];
      cotangent: [B, T, N, H].
    """
    q, k, v, bias, g = (np.asarray(a, np.float64) for a in (q, k, v, bias, cotangent))
    b_, t_, n_, h_ = q.shape
    group = n_ // k.shape[2]
    scale = 1.0 / math.sqrt(h_)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dbias = np.zeros_like(bias)
    for b in range(b_):
        for n in range(n_):
            kh = n // group
            for t in range(t_):
                visible = np.flatnonzero(mask[b, n, t])
                if visible.size == 0:
                    continue
                logits = scale * k[b, visible, kh] @ q[b, t, n] + bias[b, n, t, visible]
                p = np.exp(logits - logits.max())
                p /= p.sum()
                dp = v[b, visible, kh] @ g[b, t, n]
                dl = p * (dp - np.sum(p * dp))
                dv[b, visible, kh] += np.outer(p, g[b, t, n])
                dq[b, t, n] += scale * dl @ k[b, visible, kh]
                dk[b, visible, kh] += scale * np.outer(dl, q[b, t, n])
                dbias[b, n, t, visible] = dl
    return dq, dk, dv, dbias
