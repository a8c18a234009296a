"""Scaled dot-product attention and the masks that feed it.

Shape letters: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K query heads per key/value head, H head dim.

The equation (Vaswani et al. 2017, eq. 1), with an optional additive bias (T5's relative
positions) and a boolean mask (True = may attend):

    attention(q, k, v) = softmax(q k^T * scale + bias, masked) v
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from llm_jax.ops.dropout import dropout
from llm_jax.ops.softmax import softmax


def big_neg(dtype) -> float:
    """The "minus infinity" used for masked logits: the most negative finite value of dtype.

    A finite value (not -inf) keeps `softmax` free of `inf - inf = nan` on rows that are
    fully masked; those rows are zeroed explicitly after the softmax.
    """
    return float(jnp.finfo(dtype).min)


@jax.custom_vjp
def _masked_softmax(logits: Float[Array, "B N T S"], mask: Bool[Array, "B N T S"]):
    """softmax over S of the logits where `mask`, rows without a True entry all zero.

    Written with its own VJP: the backward reads only the probabilities p
    (d logits = p * (g - sum_S g p)), so training saves one [B, N, T, S] tensor per layer
    instead of two (autodiff of `softmax` also keeps its unnormalised exponentials), and the
    backward is one elementwise pass.
    """
    return _masked_softmax_fwd(logits, mask)[0]


def _masked_softmax_fwd(logits, mask):
    probs = softmax(jnp.where(mask, logits, big_neg(jnp.float32)), axis=-1)
    # A fully masked row has uniform probabilities over garbage keys; zero it.
    probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)
    return probs, probs


def _masked_softmax_bwd(probs, g):
    return probs * (g - jnp.sum(g * probs, axis=-1, keepdims=True)), None


_masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


# Longer than 60 lines on purpose: the argument checks that name the fix, then the equation
# with a shape per intermediate, read top to bottom as one formula.
def dot_product_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    mask: Bool[Array, "#B #N #T #S"] | None = None,
    bias: Float[Array, "#B #N #T #S"] | None = None,
    *,
    scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> Float[Array, "B T N H"]:
    """Multi-head, grouped-query or multi-query scaled dot-product attention.

    Query head n uses key/value head n // (N // K), so K == N is multi-head attention,
    1 < K < N grouped-query attention and K == 1 multi-query attention.

    Args:
      q: queries [B, T, N, H].
      k: keys [B, S, K, H]; K must divide N.
      v: values [B, S, K, H].
      mask: boolean, True where a query may attend to a key; broadcastable to [B, N, T, S]
        (masks from this module are [B, 1, T, S]).
      bias: additive logit bias broadcastable to [B, N, T, S] (T5 relative positions).
      scale: multiplier of q k^T; defaults to 1 / sqrt(H). T5 uses 1.0.
      dropout_rate: dropout on the attention probabilities, applied only when
        `dropout_rng` is given (training).

    Returns:
      [B, T, N, H] in q's dtype. The softmax runs in float32 whatever the input dtype; a
      query whose keys are all masked gets an all-zero output row instead of NaN.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be rank 4 ([B, T, N, H] and [B, S, K, H]); got shapes "
            f"{q.shape}, {k.shape}, {v.shape}."
        )
    b, t, n, h = q.shape
    _, s, kh, _ = k.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got {k.shape} and {v.shape}.")
    if k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch or head dim.")
    if n % kh:
        raise ValueError(
            f"the number of query heads ({n}) must be a multiple of the number of key/value "
            f"heads ({kh}); choose num_kv_heads dividing num_heads."
        )
    g = n // kh
    if scale is None:
        scale = h**-0.5

    qg = q.reshape(b, t, kh, g, h)
    # [B, K, G, T, S]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * scale
    logits = logits.reshape(b, n, t, s)  # [B, N, T, S]
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is None:
        probs = softmax(logits, axis=-1)  # [B, N, T, S] float32
    else:
        probs = _masked_softmax(logits, jnp.broadcast_to(mask, logits.shape))
    probs = dropout(probs, dropout_rate, dropout_rng)
    probs = probs.astype(v.dtype).reshape(b, kh, g, t, s)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)  # [B, T, K, G, H]
    return out.reshape(b, t, n, h).astype(q.dtype)


def attention_beside_cache(
    q: Float[Array, "B T N H"],
    k_new: Float[Array, "B T K H"],
    v_new: Float[Array, "B T K H"],
    k_old: Float[Array, "B S K H"],
    v_old: Float[Array, "B S K H"],
    mask: Bool[Array, "#B #N T S"],
    index: Int[Array, ""],
    *,
    scale: float | None = None,
) -> Float[Array, "B T N H"]:
    """`dot_product_attention` over a cache with T new keys/values written at slots
    index..index+T-1, computed from the cache as it was before that write plus the new
    keys/values themselves (same logits, same softmax, same sum).

    `mask` is the mask of the written cache [.., T, S]; the written slots' columns are read
    from the new keys instead of the cache. Decoding uses this to let the cache update be
    the write's only reader (see `llm_jax.models._xla_cpu`).
    """
    b, t, n, h = q.shape
    s, kh = k_old.shape[1], k_old.shape[2]
    g = n // kh
    scale = h**-0.5 if scale is None else scale
    qg = q.reshape(b, t, kh, g, h)
    mask = jnp.broadcast_to(mask, (b, n, t, s)).reshape(b, kh, g, t, s)
    written = (jnp.arange(s) >= index) & (jnp.arange(s) < index + t)  # [S]
    mask_new = jax.lax.dynamic_slice_in_dim(mask, index, t, axis=4)  # [B, K, G, T, T]
    mask = jnp.concatenate([mask & ~written, mask_new], axis=-1)  # [B, K, G, T, S + T]
    logits = jnp.concatenate(
        [
            jnp.einsum("BTKGH,BSKH->BKGTS", qg, k_old, preferred_element_type=jnp.float32),
            jnp.einsum("BTKGH,BSKH->BKGTS", qg, k_new, preferred_element_type=jnp.float32),
        ],
        axis=-1,
    )
    probs = _masked_softmax(logits.astype(jnp.float32) * scale, mask).astype(v_old.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., :s], v_old)
    out = out + jnp.einsum("BKGTS,BSKH->BTKGH", probs[..., s:], v_new)
    return out.reshape(b, t, n, h).astype(q.dtype)


def causal_mask(
    q_len: int, kv_len: int | None = None, *, q_offset: int | Int[Array, ""] = 0
) -> Bool[Array, "1 1 T S"]:
    """Query i may attend to key j iff j <= i + q_offset.

    `q_offset` places the queries at absolute positions q_offset .. q_offset + T - 1, which
    is how a decode step with a KV cache of length S sees the past.
    """
    kv_len = q_len if kv_len is None else kv_len
    qi = jnp.arange(q_len)[:, None] + q_offset
    kj = jnp.arange(kv_len)[None, :]
    return (kj <= qi)[None, None]


def padding_mask(
    q_valid: Bool[Array, "B T"], kv_valid: Bool[Array, "B S"] | None = None
) -> Bool[Array, "B 1 T S"]:
    """Attend only between real (non-padding) tokens.

    mask[b, 0, i, j] = q_valid[b, i] & kv_valid[b, j].
    """
    kv_valid = q_valid if kv_valid is None else kv_valid
    return (q_valid[:, :, None] & kv_valid[:, None, :])[:, None]


def segment_mask(
    q_segments: Int[Array, "B T"], kv_segments: Int[Array, "B S"] | None = None
) -> Bool[Array, "B 1 T S"]:
    """Packed sequences: attend only within the same segment (document) id.

    Segment id 0 is padding by convention and attends to nothing (and nothing attends to it).
    """
    kv_segments = q_segments if kv_segments is None else kv_segments
    same = q_segments[:, :, None] == kv_segments[:, None, :]
    real = (q_segments[:, :, None] != 0) & (kv_segments[:, None, :] != 0)
    return (same & real)[:, None]


def bidirectional_mask(
    valid: Bool[Array, "B T"] | None = None, *, length: int | None = None
) -> Bool[Array, "#B 1 T T"]:
    """Encoder self-attention: every real token sees every real token.

    Pass `valid` [B, T] (False on padding), or only `length` for an all-True [1, 1, T, T].
    """
    if valid is None:
        if length is None:
            raise ValueError("bidirectional_mask needs `valid` or `length`.")
        return jnp.ones((1, 1, length, length), dtype=bool)
    return padding_mask(valid)


def cross_mask(q_valid: Bool[Array, "B T"], kv_valid: Bool[Array, "B S"]) -> Bool[Array, "B 1 T S"]:
    """Encoder–decoder cross-attention: real decoder tokens see real encoder tokens."""
    return padding_mask(q_valid, kv_valid)


def combine_masks(*masks: Bool[Array, "..."] | None) -> Bool[Array, "..."] | None:
    """Logical AND of the given masks (None entries are ignored); None if all are None."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out
