"""ELMo's recurrent and character math (Peters et al. 2018) as pure jnp functions.

The LSTM cell is AllenNLP's `LstmCellWithProjection`, the cell of the published ELMo: gates
in torch's order (input, forget, cell candidate, output), the memory clipped to
+-`cell_clip`, and an optional projection of the C-wide output down to P, clipped to
+-`proj_clip`. `lstm_layer` scans it over time with a per-step mask: a masked step leaves
(h, c) unchanged and outputs zeros, so one scan handles left and right padding alike, and
`reverse=True` reads each row right to left over its real tokens only.

The character encoder is ELMo's: a char embedding, one 1-D convolution per filter width
with max-over-time pooling and an activation, highway layers, then a linear projection.

Shape letters: B batch, T words, W characters per word, E char embedding width, F filters,
D input width, C memory cells, P projection width (= C without a projection).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def lstm_cell(
    x: Float[Array, "B D"],
    h: Float[Array, "B P"],
    c: Float[Array, "B C"],
    w_x: Float[Array, "D 4C"],
    w_h: Float[Array, "P 4C"],
    b: Float[Array, " 4C"],
    w_p: Float[Array, "C P"] | None = None,
    *,
    cell_clip: float | None = None,
    proj_clip: float | None = None,
) -> tuple[Float[Array, "B P"], Float[Array, "B C"]]:
    """One LSTM step with optional memory clipping and a clipped output projection.

    i, f, g, o = split(x W_x + h W_h + b); c' = clip(sigmoid(i) * tanh(g) + sigmoid(f) * c);
    h' = sigmoid(o) * tanh(c'), then h' W_p clipped when `w_p` is given.

    Args:
        x: the step's input. h, c: the previous output and memory.
        w_x, w_h, b: gate weights and bias, the four gates side by side (i, f, g, o).
        w_p: the projection C -> P, or None (then P = C).
        cell_clip, proj_clip: clip bounds; None leaves the values unclipped.

    Returns:
        (h', c'): [B, P] and [B, C].
    """
    cells = c.shape[-1]
    assert w_x.shape == (x.shape[-1], 4 * cells), (w_x.shape, x.shape, cells)
    assert w_h.shape == (h.shape[-1], 4 * cells), (w_h.shape, h.shape, cells)
    # [B, 4C]
    gates = jnp.einsum("BD,DG->BG", x, w_x) + jnp.einsum("BP,PG->BG", h, w_h) + b
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c_new = jax.nn.sigmoid(i) * jnp.tanh(g) + jax.nn.sigmoid(f) * c
    if cell_clip is not None:
        c_new = jnp.clip(c_new, -cell_clip, cell_clip)
    h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
    if w_p is not None:
        h_new = jnp.einsum("BC,CP->BP", h_new, w_p)
        if proj_clip is not None:
            h_new = jnp.clip(h_new, -proj_clip, proj_clip)
    return h_new, c_new


def lstm_layer(
    x: Float[Array, "B T D"],
    mask: Bool[Array, "B T"],
    w_x: Float[Array, "D 4C"],
    w_h: Float[Array, "P 4C"],
    b: Float[Array, " 4C"],
    w_p: Float[Array, "C P"] | None = None,
    *,
    cell_clip: float | None = None,
    proj_clip: float | None = None,
    reverse: bool = False,
    initial: tuple[Array, Array] | None = None,
) -> tuple[Float[Array, "B T P"], tuple[Float[Array, "B P"], Float[Array, "B C"]]]:
    """`lstm_cell` scanned over T (`lax.scan`), from zero state unless `initial` is given.

    Masked positions keep the state and output zeros: a left-padded row starts on its first
    real token and a right-padded one ends on its last, in either direction.

    Args:
        x: the inputs. mask: True on real positions.
        w_x, w_h, b, w_p, cell_clip, proj_clip: as `lstm_cell`.
        reverse: scan from T-1 down to 0 (the backward language model).
        initial: (h, c) [B, P], [B, C] to start from.

    Returns:
        outputs [B, T, P] (zeros where masked) and the final (h, c).
    """
    batch, cells = x.shape[0], b.shape[-1] // 4
    proj = cells if w_p is None else w_p.shape[-1]
    assert mask.shape == x.shape[:2], (mask.shape, x.shape)
    if initial is None:
        initial = (jnp.zeros((batch, proj), x.dtype), jnp.zeros((batch, cells), x.dtype))

    def step(carry, xs):
        h, c = carry
        x_t, m_t = xs  # [B, D], [B]
        h_new, c_new = lstm_cell(
            x_t, h, c, w_x, w_h, b, w_p, cell_clip=cell_clip, proj_clip=proj_clip
        )
        keep = m_t[:, None]
        h, c = jnp.where(keep, h_new, h), jnp.where(keep, c_new, c)
        return (h, c), jnp.where(keep, h_new, 0.0)

    # Time-major for the scan: [T, B, D] and [T, B].
    final, out = jax.lax.scan(
        step, initial, (jnp.swapaxes(x, 0, 1), jnp.swapaxes(mask, 0, 1)), reverse=reverse
    )
    return jnp.swapaxes(out, 0, 1), final


def char_cnn(
    chars: Float[Array, "B T W E"],
    kernels: Sequence[Float[Array, "K E F"]],
    biases: Sequence[Float[Array, " F"]],
    *,
    activation: str = "relu",
) -> Float[Array, "B T F"]:
    """ELMo's character convolutions: per filter width K, a valid 1-D convolution over the
    W characters, max over positions, then the activation; the filters concatenated.

    Args:
        chars: embedded characters of each word.
        kernels: one [K, E, F_k] kernel per filter width K (K <= W).
        biases: one [F_k] bias each.
        activation: "relu" or "tanh" (the published ELMo uses relu).

    Returns:
        [B, T, sum_k F_k].
    """
    assert len(kernels) == len(biases), (len(kernels), len(biases))
    act = {"relu": jax.nn.relu, "tanh": jnp.tanh}[activation]
    width = chars.shape[-2]
    pooled = []
    for kernel, bias in zip(kernels, biases, strict=True):
        k = kernel.shape[0]
        assert k <= width, f"filter width {k} exceeds {width} characters"
        # [B, T, W-K+1, F]: the sum over the K taps of each window.
        conv = sum(
            jnp.einsum("BTWE,EF->BTWF", chars[..., j : width - k + 1 + j, :], kernel[j])
            for j in range(k)
        )
        pooled.append(act(jnp.max(conv, axis=-2) + bias))
    return jnp.concatenate(pooled, axis=-1)


def highway(
    x: Float[Array, "B T D"],
    w: Float[Array, "N D 2D"],
    b: Float[Array, "N 2D"],
) -> Float[Array, "B T D"]:
    """N highway layers (Srivastava et al. 2015) as ELMo: [n, g] = x W + b;
    x <- sigmoid(g) * x + (1 - sigmoid(g)) * relu(n).

    Args:
        x: the input. w, b: each layer's weights, the non-linear part then the gate.

    Returns:
        [B, T, D].
    """
    d = x.shape[-1]
    assert w.shape[1:] == (d, 2 * d) and b.shape[1:] == (2 * d,), (w.shape, b.shape, d)
    for n in range(w.shape[0]):
        # [B, T, 2D]
        proj = jnp.einsum("BTD,DG->BTG", x, w[n]) + b[n]
        nonlinear, gate = jax.nn.relu(proj[..., :d]), jax.nn.sigmoid(proj[..., d:])
        x = gate * x + (1.0 - gate) * nonlinear
    return x


def scalar_mix(
    layers: Float[Array, "L B T D"],
    weights: Float[Array, " L"],
    gamma: Float[Array, ""],
) -> Float[Array, "B T D"]:
    """ELMo's task-specific combination gamma * sum_l softmax(weights)_l * layers_l.

    Args:
        layers: the L+1 layer representations (the L here counts all of them).
        weights: unnormalised layer weights. gamma: the scale.

    Returns:
        [B, T, D].
    """
    assert weights.shape == layers.shape[:1], (weights.shape, layers.shape)
    s = jax.nn.softmax(weights.astype(jnp.float32)).astype(layers.dtype)
    return gamma * jnp.einsum("L,LBTD->BTD", s, layers)
