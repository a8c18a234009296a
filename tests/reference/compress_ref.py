"""Float64 NumPy twins of the compression ops: distillation's KL term, the gradual pruning
schedule and the magnitude masks."""

import numpy as np


def log_softmax_ref(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def distill_kl_ref(student_logits, teacher_logits, weights, temperature):
    """(Σ w · KL(softmax(t/T) || softmax(s/T)), Σ w) over [B, T, V] logits, [B, T] weights."""
    log_ps = log_softmax_ref(np.asarray(student_logits, np.float64) / temperature)
    log_pt = log_softmax_ref(np.asarray(teacher_logits, np.float64) / temperature)
    kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
    w = np.asarray(weights, np.float64)
    return (kl * w).sum(), w.sum()


def sparsity_schedule_ref(step, final, initial=0.0, start=0, end=100, frequency=1):
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n Δt))^3 at the pruning
    steps t0, t0 + Δt, ..., t0 + nΔt; held between them and after the end."""
    if step < start:
        return 0.0
    t = min(start + (step - start) // frequency * frequency, end)
    progress = (t - start) / max(end - start, 1)
    return final + (initial - final) * (1.0 - progress) ** 3


def magnitude_mask_ref(weights, sparsity):
    """Keep all but the round-down(sparsity · n) smallest |w| of one array (stable order)."""
    w = np.abs(np.asarray(weights, np.float64)).ravel()
    k = int(np.floor(sparsity * w.size))
    keep = np.ones(w.size, bool)
    keep[np.argsort(w, kind="stable")[:k]] = False
    return keep.reshape(np.shape(weights))


def global_magnitude_masks_ref(arrays, sparsity):
    """One threshold over all arrays together: `magnitude_mask_ref` of their concatenation."""
    flat = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    keep = magnitude_mask_ref(flat, sparsity)
    out, i = [], 0
    for a in arrays:
        out.append(keep[i : i + np.size(a)].reshape(np.shape(a)))
        i += np.size(a)
    return out
