"""Word2Vec output layers over gathered rows: negative sampling and hierarchical softmax.

Both take the input vector h of each example (a word's row for skip-gram, the mean of the
context rows for CBOW) and the rows of the output matrix it is scored against, already
gathered, so that a training step touches only those rows (gather, compute, scatter-add).
Like the other losses they return (loss_sum, weight_sum).

Shape letters: P examples (pairs), D embedding dim, K output rows per example (1 + negatives
for negative sampling), L inner nodes on a Huffman path (padded to the longest path).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["hierarchical_softmax_loss", "negative_sampling_loss"]


def negative_sampling_loss(
    h: Float[Array, "P D"],
    rows: Float[Array, "P K D"],
    weights: Float[Array, "P K"],
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mikolov et al. 2013's negative-sampling loss, as (loss_sum, weight_sum).

    Row 0 of each example is the true output word, rows 1.. are the k negatives:
        loss_p = -w_p0 log σ(h·r_0) - Σ_{k>=1} w_pk log σ(-h·r_k)
    A weight of 0 drops a padded example or a negative that drew the true word itself (the
    original tool skips those).

    Args:
      h: [P, D] input vectors.
      rows: [P, K, D] output rows, the true word first.
      weights: [P, K] per-row weights (0 or 1 in training).

    Returns:
      (Σ_p loss_p, Σ_p w_p0): float32 scalars.
    """
    f = jnp.einsum("pd,pkd->pk", h.astype(jnp.float32), rows.astype(jnp.float32))
    sign = jnp.where(jnp.arange(f.shape[-1]) == 0, 1.0, -1.0)
    w = weights.astype(jnp.float32)
    return -jnp.sum(w * jax.nn.log_sigmoid(sign * f)), jnp.sum(w[:, 0])


def hierarchical_softmax_loss(
    h: Float[Array, "P D"],
    nodes: Float[Array, "P L D"],
    codes: Array,
    mask: Float[Array, "P L"],
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Hierarchical softmax (Morin & Bengio 2005; Mikolov et al. 2013), as (loss_sum, count).

    The output word's probability is the product, along its Huffman path, of σ(h·n_l) for
    code bit 0 and σ(-h·n_l) for bit 1 (the original tool's convention: its label is
    1 - code):
        loss_p = -Σ_l m_pl log σ((1 - 2 c_pl) h·n_l)

    Args:
      h: [P, D] input vectors.
      nodes: [P, L, D] gathered inner-node rows, root first.
      codes: [P, L] code bits (0/1, any integer or float dtype).
      mask: [P, L] 1 on the path, 0 on padding (and on padded examples).

    Returns:
      (Σ_p loss_p, number of examples with a non-empty path): float32 scalars.
    """
    f = jnp.einsum("pd,pld->pl", h.astype(jnp.float32), nodes.astype(jnp.float32))
    sign = 1.0 - 2.0 * codes.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    return -jnp.sum(m * jax.nn.log_sigmoid(sign * f)), jnp.sum(jnp.max(m, axis=-1))
