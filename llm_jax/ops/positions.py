"""Position information: sinusoidal tables, learned-position lookup, RoPE, T5 relative buckets.

Shape letters: B batch, T sequence length, P number of positions in a table, D model dim,
N heads, H head dim, S key length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def sinusoidal_positions(
    num_positions: int, dim: int, *, max_timescale: float = 10_000.0
) -> Float[Array, "P D"]:
    """The fixed table of Vaswani et al. 2017, section 3.5.

    PE[p, 2i] = sin(p / 10000^(2i/D)),  PE[p, 2i+1] = cos(p / 10000^(2i/D)).
    Sines and cosines are interleaved exactly as in the paper. D must be even.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positions need an even dim; got {dim}.")
    pos = jnp.arange(num_positions, dtype=jnp.float32)[:, None]  # [P, 1]
    inv = jnp.exp(-math.log(max_timescale) * jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = pos * inv[None, :]  # [P, D/2]
    table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [P, D/2, 2]
    return table.reshape(num_positions, dim)


def check_positions(positions: Int[Array, "..."], num_positions: int) -> None:
    """Raise ValueError if concrete `positions` fall outside a table of `num_positions` rows.

    Traced positions (inside `jit`) have no value to check; callers validate inputs before
    compiling, which is where this is used.
    """
    if isinstance(positions, jax.core.Tracer) or positions.size == 0:
        return
    lo, hi = int(jnp.min(positions)), int(jnp.max(positions))
    if hi >= num_positions or lo < 0:
        raise ValueError(
            f"position ids span [{lo}, {hi}] but the position table has {num_positions} "
            f"rows; shorten the sequence to at most {num_positions} tokens or raise "
            f"max_position_embeddings in the model config."
        )


def learned_positions(
    table: Float[Array, "P D"], positions: Int[Array, "B T"]
) -> Float[Array, "B T D"]:
    """Look up learned absolute position embeddings (GPT-2, BERT): table[positions]."""
    return jnp.take(table, positions, axis=0)


def rope_frequencies(head_dim: int, theta: float = 10_000.0) -> Float[Array, " H2"]:
    """Inverse frequencies theta^(-2i/H) for i in [0, H/2) (Su et al. 2021)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim; got {head_dim}.")
    return theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)


def llama3_rope_frequencies(
    head_dim: int,
    theta: float,
    *,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position: int,
) -> Float[Array, " H2"]:
    """LLaMA 3.1 / 3.2 rescaled RoPE frequencies (the `llama3` rope type of Meta's release).

    With wavelengths w_i = 2 pi / f_i of the plain frequencies f_i = `rope_frequencies` and
    L = `original_max_position` (the pretraining context): components whose wavelength is
    short (w < L / high_freq_factor) keep f_i; long ones (w > L / low_freq_factor) are slowed
    to f_i / factor; in between they blend, s = (L / w - low) / (high - low),
    f = (1 - s) f_i / factor + s f_i. This stretches the usable context by `factor` while
    leaving the local (high-frequency) position signal untouched.
    """
    if not 0 < low_freq_factor < high_freq_factor:
        raise ValueError(
            f"llama3 RoPE needs 0 < low_freq_factor < high_freq_factor; got {low_freq_factor} "
            f"and {high_freq_factor}."
        )
    inv_freq = rope_frequencies(head_dim, theta)
    wavelen = 2 * jnp.pi / inv_freq
    low_wavelen = original_max_position / low_freq_factor
    high_wavelen = original_max_position / high_freq_factor
    smooth = (original_max_position / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return jnp.where(
        wavelen < high_wavelen,
        inv_freq,
        jnp.where(wavelen > low_wavelen, inv_freq / factor, blended),
    )


def apply_rope(
    x: Float[Array, "B T N H"],
    positions: Int[Array, "B T"],
    *,
    theta: float = 10_000.0,
    inv_freq: Float[Array, " H2"] | None = None,
) -> Float[Array, "B T N H"]:
    """Rotary position embedding, rotate-half convention (GPT-NeoX, LLaMA checkpoints).

    The head dim is split into halves x1 = x[..., :H/2], x2 = x[..., H/2:] and rotated by
    angle p * inv_freq[i]:  out = [x1 cos - x2 sin, x2 cos + x1 sin]. Computed in float32,
    cast back to x's dtype. Pass `inv_freq` to use rescaled frequencies (e.g. LLaMA 3).
    """
    h = x.shape[-1]
    if inv_freq is None:
        inv_freq = rope_frequencies(h, theta)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : h // 2], xf[..., h // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def t5_relative_position_bucket(
    relative_position: Int[Array, "..."],
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Int[Array, "..."]:
    """Map relative positions (key - query) to buckets, as in T5 (Raffel et al. 2020).

    Half the buckets (all of them when causal) cover small distances exactly, the rest grow
    logarithmically up to `max_distance`; further distances share the last bucket. In the
    bidirectional case the upper half of the buckets holds keys to the right of the query.
    In the causal case keys to the right map to bucket 0.
    """
    rel = relative_position
    ret = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        ret = ret + (rel > 0).astype(rel.dtype) * num_buckets
        n = jnp.abs(rel)
    else:
        n = jnp.maximum(-rel, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Guard log(0): n == 0 takes the exact branch anyway.
    val_if_large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(rel.dtype)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


def t5_relative_position_bias(
    table: Float[Array, "U N"],
    q_positions: Int[Array, "#B T"],
    k_positions: Int[Array, "#B S"],
    *,
    bidirectional: bool,
    max_distance: int = 128,
) -> Float[Array, "#B N T S"]:
    """The additive attention bias of T5: table[bucket(k_pos - q_pos)] per head.

    Args:
      table: learned bias per (bucket, head), U buckets.
      q_positions / k_positions: absolute positions of queries and keys (a leading 1 for
        positions shared by the batch).
      bidirectional: True for the encoder, False for the causal decoder.

    Returns:
      [B, N, T, S] (B may be 1) to add to the attention logits.
    """
    rel = k_positions[:, None, :] - q_positions[:, :, None]  # [B, T, S]
    buckets = t5_relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=table.shape[0], max_distance=max_distance
    )
    bias = jnp.take(table, buckets, axis=0)  # [B, T, S, N]
    return jnp.transpose(bias, (0, 3, 1, 2))
