"""Float64 NumPy twins of `llm_jax.train.task_eval`'s classification metrics.

Written from the definitions, one example at a time, independent of the JAX code (which
builds a confusion matrix with one-hot einsums): do not "simplify" them into a translation
of it. Conventions are scikit-learn's: precision / recall of a class never predicted /
never true is 0 (`zero_division=0`), and macro-F1 averages over the labels that occur as a
true label or a prediction.
"""

from __future__ import annotations

import numpy as np


def confusion_ref(logits, labels, weights):
    """[C, C] float64: [i, j] adds the weight of each example with label i predicted j.

    Args:
      logits: [B, C]; the prediction is the first index of the largest logit.
      labels: [B] ints in [0, C).
      weights: [B]; 0 drops an example.
    """
    logits = np.asarray(logits, np.float64)
    num_classes = logits.shape[-1]
    out = np.zeros((num_classes, num_classes), np.float64)
    for row, label, weight in zip(logits, labels, weights, strict=True):
        best = 0
        for j in range(num_classes):
            if row[j] > row[best]:
                best = j
        out[int(label), best] += float(weight)
    return out


def classification_scores_ref(predicted, labels, weights):
    """(accuracy, macro-F1, {class: (precision, recall)}) from weighted predictions [B]."""
    rows = zip(predicted, labels, weights, strict=True)
    kept = [(int(p), int(t), float(w)) for p, t, w in rows if w > 0]
    total = sum(w for _, _, w in kept)
    accuracy = sum(w for p, t, w in kept if p == t) / total
    classes = sorted({p for p, _, _ in kept} | {t for _, t, _ in kept})
    per_class, f1s = {}, []
    for c in classes:
        tp = sum(w for p, t, w in kept if p == c and t == c)
        fp = sum(w for p, t, w in kept if p == c and t != c)
        fn = sum(w for p, t, w in kept if p != c and t == c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        per_class[c] = (precision, recall)
    return accuracy, sum(f1s) / len(f1s), per_class
