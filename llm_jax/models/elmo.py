"""ELMo (Peters et al. 2018): a character-CNN word encoder under a forward and a backward
LSTM language model, whose layers give contextual word representations.

Words enter as characters (so any word, in the vocabulary or not, gets a vector): UTF-8
bytes framed by begin/end-of-word markers, ELMo's 262-symbol alphabet. The char CNN
(`ops.char_cnn` + `ops.highway` + a projection to D) gives layer 0; each direction is its
own stack of L `LstmCellWithProjection` layers (`ops.lstm_layer`, the backward one scanned
right to left), with a residual connection from layer 2 on, as the original. One softmax
over the word vocabulary, shared by the two directions, predicts the next word (forward)
and the previous word (backward).

`Elmo.embed(chars, mask)` returns the L+1 layers [L+1, B, T, 2D] (layer 0 is the token
encoding repeated for both directions, as in the original); `ScalarMix` combines them
with softmax-normalised weights and a scale gamma for a downstream task.

Shape letters: B batch, T words, W characters per word, E char embedding width, D
projection width, C LSTM cells, V word vocabulary, L LSTM layers.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from llm_jax import ops
from llm_jax.config import Config, at_least, in_interval, one_of
from llm_jax.models.layers import param
from llm_jax.ops import lstm as lstm_ops

# ELMo's character alphabet: byte b is b + 1, five markers after the 256 bytes, 0 is a
# padding word (all its characters 0).
CHAR_VOCAB = 262
BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 257, 258, 259, 260, 261
BOS, EOS, UNK = "<S>", "</S>", "<UNK>"

# The published "small" ELMo's character filters (width, count).
SMALL_FILTERS = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ElmoConfig(Config):
    """ELMo's architecture; the defaults are the published small model's options
    (`elmo_2x1024_128_2048cnn_1xhighway`): 2 layers of 1024 cells projected to 128,
    clipping at 3, one highway layer, 2048 char filters, 50 characters a word; its
    dropout 0.1 is `configs/elmo_small.yaml`'s, the default 0.0 being today's behaviour.

    `vocab_size` is the output softmax's V; 0 means "from the training vocabulary" (the
    trainer fills it in before building the model).
    """

    section: ClassVar[str] = "model"

    family: str = "elmo"  # marks an ELMo run config for `llm-jax train`
    vocab_size: int = 0
    max_chars: int = 50  # W, including the begin/end-of-word markers
    char_embed_dim: int = 16  # E
    filters: tuple[tuple[int, int], ...] = SMALL_FILTERS
    num_highway: int = 1
    activation: str = "relu"
    num_layers: int = 2  # L per direction
    cell_dim: int = 1024  # C
    proj_dim: int = 128  # D; also the char encoder's output width
    cell_clip: float | None = 3.0
    proj_clip: float | None = 3.0
    residual: bool = True  # layer l > 1 adds its input to its output
    # Dropout on each LSTM layer's input and on the top layer's output before the softmax
    # (bilm-tf's recipe; its published models trained with 0.1), in training only: the
    # model applies it when given an rng. 0.0 keeps runs configured before it unchanged.
    dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_chars", "char_embed_dim", "num_layers", "cell_dim", "proj_dim"):
            at_least(self, name, 1)
        at_least(self, "vocab_size", 0, note="0 = the training vocabulary's size")
        at_least(self, "num_highway", 0)
        at_least(self, "cell_clip", 0, strict=True)
        at_least(self, "proj_clip", 0, strict=True)
        one_of(self, "activation", ("relu", "tanh"))
        in_interval(self, "dropout_rate", 0.0, 1.0, high_open=True)
        one_of(self, "family", ("elmo",))
        if self.max_chars < 3:
            raise ValueError("model.max_chars must be >= 3 (two word markers and a character).")
        bad = [f for f in self.filters if len(f) != 2 or f[0] < 1 or f[1] < 1]
        if not self.filters or bad:
            raise ValueError(
                f"model.filters={list(self.filters)} must be a non-empty list of [width, "
                "count] pairs of positive integers, e.g. [[1, 32], [2, 32], [3, 64]]."
            )
        widest = max(w for w, _ in self.filters)
        if widest > self.max_chars:
            raise ValueError(
                f"model.filters has width {widest} > model.max_chars={self.max_chars}; "
                "raise max_chars or drop the wider filters."
            )

    @property
    def num_filters(self) -> int:
        """The char CNN's width before the highway layers."""
        return sum(n for _, n in self.filters)


# ----------------------------------------------------------------------------- characters


def word_chars(word: str, max_chars: int) -> tuple[np.ndarray, bool]:
    """A word's character ids [W] and whether it was cut: <S> and </S> are their markers,
    other words their UTF-8 bytes (the first W - 2 of them) between begin/end of word."""
    if word == BOS:
        body = [BOS_CHAR]
    elif word == EOS:
        body = [EOS_CHAR]
    else:
        body = [b + 1 for b in word.encode("utf-8")]
    cut = len(body) > max_chars - 2
    row = np.full(max_chars, PAD_CHAR, np.int32)
    ids = [BOW_CHAR, *body[: max_chars - 2], EOW_CHAR]
    row[: len(ids)] = ids
    return row, cut


def encode_chars(
    sentences: Sequence[Sequence[str]], max_chars: int, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded character ids of a batch of word sequences, and their mask.

    Words longer than `max_chars - 2` bytes are truncated to that many, with one warning
    per call naming how many were cut and the first of them (the original does the same
    cut, silently).

    Args:
        sentences: B sequences of words (already framed with <S> / </S> if wanted).
        max_chars: W, the model's `max_chars`.
        length: T; default the longest sequence. Longer sequences raise ValueError.

    Returns:
        chars int32 [B, T, W] (0 on padding words) and mask bool [B, T].
    """
    t = max((len(s) for s in sentences), default=0) if length is None else length
    longest = max((len(s) for s in sentences), default=0)
    if longest > t:
        raise ValueError(f"a sequence has {longest} words, more than length={t}; raise length.")
    chars = np.zeros((len(sentences), t, max_chars), np.int32)
    mask = np.zeros((len(sentences), t), bool)
    cut = []
    for i, words in enumerate(sentences):
        for j, w in enumerate(words):
            chars[i, j], was_cut = word_chars(w, max_chars)
            cut += [w] if was_cut else []
        mask[i, : len(words)] = True
    if cut:
        warnings.warn(
            f"{len(cut)} word(s) longer than max_chars - 2 = {max_chars - 2} bytes were "
            f"truncated (the first: {cut[0][:40]!r}...); raise model.max_chars to keep them.",
            stacklevel=2,
        )
    return chars, mask


def check_chars(cfg: ElmoConfig, chars: np.ndarray | Array, mask: np.ndarray | Array) -> None:
    """ValueError, before any compilation, for character ids that do not fit the model."""
    if chars.ndim != 3 or chars.shape[-1] != cfg.max_chars or mask.shape != chars.shape[:2]:
        raise ValueError(
            f"chars must be [B, T, max_chars={cfg.max_chars}] with a mask [B, T]; got "
            f"{tuple(chars.shape)} and {tuple(mask.shape)}. Build them with "
            "llm_jax.models.elmo.encode_chars(sentences, cfg.max_chars)."
        )


# -------------------------------------------------------------------------------- modules


class CharEncoder(nnx.Module):
    """Characters [B, T, W] -> word vectors [B, T, D]: embedding, CNN, highway, projection."""

    def __init__(self, cfg: ElmoConfig, *, rngs: nnx.Rngs):
        e, f, d = cfg.char_embed_dim, cfg.num_filters, cfg.proj_dim
        self.activation = cfg.activation
        self.embed = param(rngs, (CHAR_VOCAB, e), ("char_vocab", "char_embed"), std=1.0)
        self.kernels = nnx.List(
            param(rngs, (k, e, n), (None, "char_embed", "filters"), std=(k * e) ** -0.5)
            for k, n in cfg.filters
        )
        self.biases = nnx.List(param(None, (n,), ("filters",)) for _, n in cfg.filters)
        self.highway_w = param(
            rngs, (cfg.num_highway, f, 2 * f), ("layers", "filters", None), std=f**-0.5
        )
        # Gate bias 1: each highway layer starts close to carrying its input through.
        bias = np.zeros((cfg.num_highway, 2 * f), np.float32)
        bias[:, f:] = 1.0
        self.highway_b = nnx.Param(
            jnp.asarray(bias), out_sharding=("layers", None), eager_sharding=False
        )
        self.proj_w = param(rngs, (f, d), ("filters", "embed"), std=f**-0.5)
        self.proj_b = param(None, (d,), ("embed",))

    def __call__(self, chars: Int[Array, "B T W"]) -> Float[Array, "B T D"]:
        x = jnp.take(self.embed[...], chars, axis=0)  # [B, T, W, E]
        kernels = [k[...] for k in self.kernels]
        biases = [b[...] for b in self.biases]
        x = lstm_ops.char_cnn(x, kernels, biases, activation=self.activation)  # [B, T, F]
        x = lstm_ops.highway(x, self.highway_w[...], self.highway_b[...])
        return jnp.einsum("BTF,FD->BTD", x, self.proj_w[...]) + self.proj_b[...]


class LstmLayer(nnx.Module):
    """One `LstmCellWithProjection` layer: input D_in -> C cells -> projection D."""

    def __init__(self, d_in: int, cfg: ElmoConfig, *, rngs: nnx.Rngs):
        c, d = cfg.cell_dim, cfg.proj_dim
        self.cell_clip, self.proj_clip = cfg.cell_clip, cfg.proj_clip
        self.w_x = param(rngs, (d_in, 4 * c), ("embed", "mlp"), std=d_in**-0.5)
        self.w_h = param(rngs, (d, 4 * c), ("embed", "mlp"), std=d**-0.5)
        # Forget-gate bias 1 (Jozefowicz et al. 2015), so early memories are kept.
        self.b = nnx.Param(
            jnp.zeros((4 * c,)).at[c : 2 * c].set(1.0), out_sharding=("mlp",), eager_sharding=False
        )
        self.w_p = param(rngs, (c, d), ("mlp", "embed"), std=c**-0.5)

    def __call__(
        self, x: Float[Array, "B T D"], mask: Bool[Array, "B T"], *, reverse: bool
    ) -> Float[Array, "B T D"]:
        out, _ = lstm_ops.lstm_layer(
            x,
            mask,
            self.w_x[...],
            self.w_h[...],
            self.b[...],
            self.w_p[...],
            cell_clip=self.cell_clip,
            proj_clip=self.proj_clip,
            reverse=reverse,
        )
        return out


class Elmo(nnx.Module):
    """The biLM: char encoder, forward and backward LSTM stacks, a tied word softmax."""

    def __init__(self, cfg: ElmoConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size < 2:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: set it to the word vocabulary's size "
                "(the trainer does so from the corpus) before building an Elmo."
            )
        self.config = cfg
        d = cfg.proj_dim
        self.chars = CharEncoder(cfg, rngs=rngs)
        self.forward_layers = nnx.List(LstmLayer(d, cfg, rngs=rngs) for _ in range(cfg.num_layers))
        self.backward_layers = nnx.List(LstmLayer(d, cfg, rngs=rngs) for _ in range(cfg.num_layers))
        self.softmax_w = param(rngs, (d, cfg.vocab_size), ("embed", "vocab"), std=d**-0.5)
        self.softmax_b = param(None, (cfg.vocab_size,), ("vocab",))

    def _stack(self, layers, x, mask, reverse: bool, rng: jax.Array | None) -> list[Array]:
        outs = []
        keys = [None] * len(layers) if rng is None else list(jax.random.split(rng, len(layers)))
        for i, (layer, key) in enumerate(zip(layers, keys, strict=True)):
            # bilm-tf wraps each (residual) cell in a dropout on its input, so the layer and
            # its skip connection both see the dropped input.
            x = ops.dropout(x, self.config.dropout_rate, key)
            y = layer(x, mask, reverse=reverse)
            # The original's skip connections: every layer but the first adds its input.
            x = y + x if (i > 0 and self.config.residual) else y
            outs.append(x)
        return outs

    def directions(
        self, chars: Int[Array, "B T W"], mask: Bool[Array, "B T"], rng: jax.Array | None = None
    ) -> tuple[Array, list[Array], list[Array]]:
        """(token encoding [B, T, D], forward outputs, backward outputs: L of [B, T, D]);
        with `rng`, in training, dropout on each LSTM layer's input."""
        mask = mask.astype(bool)
        x = self.chars(chars) * mask[..., None]
        fwd_rng, bwd_rng = (None, None) if rng is None else jax.random.split(rng)
        return (
            x,
            self._stack(self.forward_layers, x, mask, False, fwd_rng),
            self._stack(self.backward_layers, x, mask, True, bwd_rng),
        )

    def embed(
        self, chars: Int[Array, "B T W"], mask: Bool[Array, "B T"]
    ) -> Float[Array, "L1 B T 2D"]:
        """The L+1 layer representations, forward and backward side by side: [L+1, B, T, 2D]
        (zeros on masked positions)."""
        check_chars(self.config, chars, mask)
        x, fwd, bwd = self.directions(chars, mask)
        layers = [jnp.concatenate([x, x], -1)]
        layers += [jnp.concatenate([f, b], -1) for f, b in zip(fwd, bwd, strict=True)]
        return jnp.stack(layers) * mask[None, ..., None]

    def lm_logits(
        self, chars: Int[Array, "B T W"], mask: Bool[Array, "B T"], rng: jax.Array | None = None
    ) -> tuple[Float[Array, "B T V"], Float[Array, "B T V"]]:
        """Logits of the next word (forward) and of the previous word (backward); `rng`
        (training) turns on `dropout_rate`, None (evaluation) leaves it off."""
        check_chars(self.config, chars, mask)
        rate, (stack_rng, out_rng) = self.config.dropout_rate, _split(rng)
        _, fwd, bwd = self.directions(chars, mask, stack_rng)
        out_keys = _split(out_rng)
        top = [ops.dropout(h[-1], rate, k) for h, k in zip((fwd, bwd), out_keys, strict=True)]
        w, b = self.softmax_w[...], self.softmax_b[...]
        return (
            jnp.einsum("BTD,DV->BTV", top[0], w) + b,
            jnp.einsum("BTD,DV->BTV", top[1], w) + b,
        )

    def lm_losses(
        self,
        chars: Int[Array, "B T W"],
        words: Int[Array, "B T"],
        mask: Bool[Array, "B T"],
        rng: jax.Array | None = None,
    ) -> dict[str, tuple[Array, Array]]:
        """{"forward", "backward": (cross-entropy sum, count)} of the two LMs on a batch whose
        real words are contiguous in each row (left or right padding); `rng` as in
        `lm_logits`."""
        fwd, bwd = self.lm_logits(chars, mask, rng)
        return lm_losses(fwd, bwd, words, mask)


def _split(rng: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
    """Two keys of `rng`, or two Nones (no dropout) without one."""
    return (None, None) if rng is None else tuple(jax.random.split(rng))


def lm_losses(
    fwd_logits: Float[Array, "B T V"],
    bwd_logits: Float[Array, "B T V"],
    words: Int[Array, "B T"],
    mask: Bool[Array, "B T"],
) -> dict[str, tuple[Array, Array]]:
    """Position t's forward logits predict word t+1, its backward logits word t-1; a pair
    counts when both positions are real."""
    m = mask.astype(jnp.float32)
    pad = jnp.zeros_like(words[:, :1])
    next_words = jnp.concatenate([words[:, 1:], pad], 1)
    prev_words = jnp.concatenate([pad, words[:, :-1]], 1)
    zero = jnp.zeros_like(m[:, :1])
    next_w = m * jnp.concatenate([m[:, 1:], zero], 1)
    prev_w = m * jnp.concatenate([zero, m[:, :-1]], 1)
    return {
        "forward": ops.cross_entropy(fwd_logits, next_words, next_w),
        "backward": ops.cross_entropy(bwd_logits, prev_words, prev_w),
    }


class ScalarMix(nnx.Module):
    """A task's combination of ELMo's L+1 layers: gamma * sum_l softmax(s)_l h_l."""

    def __init__(self, num_layers: int):
        self.weights = param(None, (num_layers,), ("layers",))
        self.gamma = param(None, (), (), value=1.0)

    def __call__(self, layers: Float[Array, "L1 B T D"]) -> Float[Array, "B T D"]:
        return lstm_ops.scalar_mix(layers, self.weights[...], self.gamma[...])


def build(cfg: ElmoConfig, *, seed: int = 0) -> Elmo:
    """An Elmo with fresh parameters drawn from `seed`."""
    return Elmo(cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))
