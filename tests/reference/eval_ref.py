"""Float64 NumPy twins of `llm_jax.eval`'s scoring: the continuation log-likelihood and
greedy check of one row, and the sliding-window token coverage of the perplexity recipe.

Written from the definitions, one position at a time, independent of the JAX code (which
uses take_along_axis and logsumexp over the whole batch).
"""

from __future__ import annotations

import math

import numpy as np


def target_scores_ref(logits, targets, weights):
    """(sum of log p(target) over weighted positions [B], every weighted target is the
    first argmax [B]) in float64."""
    logits = np.asarray(logits, np.float64)
    B, T, _ = logits.shape
    ll, greedy = np.zeros(B), np.ones(B, bool)
    for b in range(B):
        for t in range(T):
            if weights[b, t] == 0:
                continue
            row = logits[b, t]
            top = row.max()
            log_z = top + math.log(sum(math.exp(x - top) for x in row))
            ll[b] += weights[b, t] * (row[targets[b, t]] - log_z)
            greedy[b] &= int(np.argmax(row)) == int(targets[b, t])
    return ll, greedy


def window_coverage_ref(n_tokens, max_length, stride):
    """For the sequence positions 1..n-1 of an n-token sequence (position 0 is the prefix):
    (the window start whose scores count for that position, as in Hugging Face's perplexity
    recipe with windows of max_length + 1 tokens)."""
    owner = {}
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length + 1, n_tokens)
        for pos in range(max(prev_end, begin + 1), end):
            owner[pos] = begin
        prev_end = end
        if end == n_tokens:
            break
    return owner
