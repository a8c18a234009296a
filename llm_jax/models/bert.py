"""Bidirectional encoder: BERT (Devlin et al. 2019), RoBERTa and ALBERT via config.

Word + position + token-type embeddings, post-LayerNorm blocks, a pooler on the first
token, an MLM head (transform + norm + tied decoder + bias), an NSP (or ALBERT SOP) head and
a sequence-classification head. RoBERTa: `use_nsp=False, type_vocab_size=1`. ALBERT:
`embedding_dim=E` (factorized embeddings E -> D) and `share_layers=True`.

Shape letters: B batch, T length, D model dim, E embedding dim, V vocab, C classes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from llm_jax import ops
from llm_jax.models.attention_impl import AttentionMask
from llm_jax.models.config import ModelConfig
from llm_jax.models.init import init_scheme
from llm_jax.models.inputs import (
    check_length,
    check_tokens,
    default_positions,
    embed_inputs,
    is_traced,
    split_key,
)
from llm_jax.models.layers import (
    BlockSpec,
    Einsum,
    Embed,
    block_spec,
    block_stack,
    lookup_table,
    make_norm,
    param,
)
from llm_jax.parallel.rules import constrain


def _dense_maker(spec: BlockSpec, std: float, rngs: nnx.Rngs) -> Callable[..., Einsum]:
    """`dense(equation, shape, axes, bias_shape, bias_axes)`: BERT's dense layers, which keep
    their biases whatever `use_bias` says."""
    common = dict(dtype=spec.dtype, param_dtype=spec.param_dtype, rngs=rngs)

    def dense(equation, shape, axes, bias_shape, bias_axes) -> Einsum:
        return Einsum(
            equation, shape, axes, std=std, bias_shape=bias_shape, bias_axes=bias_axes, **common
        )

    return dense


class BERT(nnx.Module):
    """A BERT-style encoder with optional pretraining and classification heads.

    `model(tokens)` returns masked-LM logits [B, T, V]; `encode` the hidden states,
    `pretraining_logits` MLM and NSP logits together, `classify` class logits [B, C].
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "bert":
            raise ValueError(f"BERT needs a config with family='bert'; got {cfg.family!r}.")
        self.cfg = cfg
        spec, init = block_spec(cfg), init_scheme(cfg)
        dense = _dense_maker(spec, init.dense, rngs)
        self._init_embeddings(spec, init.dense, dense, rngs)
        self.layers = block_stack(
            cfg, spec, init, cfg.num_layers, shared=cfg.share_layers, rngs=rngs
        )
        self._init_heads(spec, dense)

    def _init_embeddings(
        self, spec: BlockSpec, std: float, dense: Callable[..., Einsum], rngs: nnx.Rngs
    ):
        """Word, position and token-type tables [., E], their norm, ALBERT's E -> D."""
        cfg, pdtype, d, e = self.cfg, spec.param_dtype, self.cfg.d_model, self.cfg.embed_dim
        self.embed = Embed(
            cfg.vocab_size, e, std=std, dtype=spec.dtype, param_dtype=pdtype, rngs=rngs
        )
        self.pos_embed = param(
            rngs, (cfg.max_position_embeddings, e), ("positions", "embed"), std=std, dtype=pdtype
        )
        self.type_embed = (
            param(rngs, (cfg.type_vocab_size, e), ("types", "embed"), std=std, dtype=pdtype)
            if cfg.type_vocab_size
            else None
        )
        self.embed_norm = make_norm(spec, e)
        self.embed_proj = (
            dense("BTE,ED->BTD", (e, d), ("embed", "mlp"), (d,), ("mlp",)) if e != d else None
        )

    def _init_heads(self, spec: BlockSpec, dense: Callable[..., Einsum]):
        """Pooler, MLM head, NSP head and classifier, each None unless the config asks."""
        cfg, d, e = self.cfg, self.cfg.d_model, self.cfg.embed_dim
        self.pooler = (
            dense("BD,DE->BE", (d, d), ("embed", "mlp"), (d,), ("mlp",)) if cfg.use_pooler else None
        )
        if cfg.use_mlm_head:
            self.mlm_transform = dense("BTD,DE->BTE", (d, e), ("mlp", "embed"), (e,), ("embed",))
            self.mlm_norm = make_norm(spec, e)
            self.mlm_bias = param(None, (cfg.vocab_size,), ("vocab",), dtype=spec.param_dtype)
        else:
            self.mlm_transform = self.mlm_norm = self.mlm_bias = None
        self.nsp_head = (
            dense("BD,DC->BC", (d, 2), ("embed", "classes"), (2,), ("classes",))
            if cfg.use_nsp
            else None
        )
        c = cfg.num_labels
        self.classifier = (
            dense("BD,DC->BC", (d, c), ("embed", "classes"), (c,), ("classes",)) if c else None
        )

    def encode(
        self,
        tokens: Int[Array, "B T"] | None = None,
        *,
        token_type_ids: Int[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        inputs_embeds: Float[Array, "B T E"] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B T D"]:
        """Final hidden states [B, T, D].

        Args:
          tokens: token ids [B, T], or `inputs_embeds` [B, T, E] instead.
          token_type_ids: segment A/B ids [B, T] (zeros when None).
          positions: [B, T]; default 0..T-1.
          segment_ids: [B, T] attention segments; 0 marks padding (a Hugging Face
            `attention_mask` of ones and zeros is exactly this). None: no padding.
          dropout_rng: a PRNG key turns dropout on (training); None is eval mode.
        """
        cfg = self.cfg
        x = embed_inputs(self.embed, tokens, inputs_embeds, dtype=jnp.dtype(cfg.dtype), width="E")
        b, t = x.shape[:2]
        check_length(t, cfg.max_position_embeddings)
        if positions is None:
            positions = default_positions(b, t)
        elif not is_traced(positions):
            ops.check_positions(positions, cfg.max_position_embeddings)
        x = x + ops.learned_positions(
            lookup_table(self.pos_embed[...], "positions"), positions
        ).astype(x.dtype)
        if self.type_embed is not None:
            if token_type_ids is None:
                token_type_ids = jnp.zeros((b, t), jnp.int32)
            check_tokens(token_type_ids, cfg.type_vocab_size, name="token_type_ids")
            types = jnp.take(lookup_table(self.type_embed[...], "types"), token_type_ids, axis=0)
            x = x + types.astype(x.dtype)
        x = self.embed_norm(x)
        rngs = split_key(dropout_rng, 2)
        x = constrain(ops.dropout(x, cfg.dropout_rate, rngs[0]), ("batch", "length", "embed"))
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        mask = None
        if segment_ids is not None:  # dense part: ops.segment_mask, as the reference reads it
            mask = AttentionMask.of(x.shape[1], causal=False, segment_ids=segment_ids)
        x, _ = self.layers(x, mask=mask, dropout_rng=rngs[1])
        return x

    def pool(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B D"]:
        """The pooled representation: tanh(W h[:, 0] + b) of the first ([CLS]) token."""
        if self.pooler is None:
            raise ValueError("this BERT has no pooler; build it with use_pooler=True.")
        return jnp.tanh(self.pooler(hidden[:, 0]))

    def mlm_logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Masked-LM logits: norm(act(W h + b)) E^T + bias, decoder tied to the embeddings."""
        if self.mlm_transform is None:
            raise ValueError("this BERT has no MLM head; build it with use_mlm_head=True.")
        h = ops.get_activation(self.cfg.activation)(self.mlm_transform(hidden))
        h = self.mlm_norm(h)
        logits = self.embed.attend(h) + self.mlm_bias[...].astype(h.dtype)
        return constrain(logits, ("batch", "length", "vocab"))

    def nsp_logits(self, pooled: Float[Array, "B D"]) -> Float[Array, "B 2"]:
        """Next-sentence (or sentence-order) logits; class 0 = B follows A."""
        if self.nsp_head is None:
            raise ValueError("this BERT has no NSP head; build it with use_nsp=True.")
        return self.nsp_head(pooled)

    def pretraining_logits(
        self, tokens: Int[Array, "B T"], *, dropout_rng: jax.Array | None = None, **kwargs
    ) -> tuple[Float[Array, "B T V"], Float[Array, "B 2"] | None]:
        """MLM logits and, when the model has an NSP head, NSP logits, from one forward."""
        hidden = self.encode(tokens, dropout_rng=dropout_rng, **kwargs)
        nsp = self.nsp_logits(self.pool(hidden)) if self.nsp_head is not None else None
        return self.mlm_logits(hidden), nsp

    def classify(
        self, tokens: Int[Array, "B T"], *, dropout_rng: jax.Array | None = None, **kwargs
    ) -> Float[Array, "B C"]:
        """Sequence-classification logits [B, num_labels] from the pooled first token."""
        if self.classifier is None:
            raise ValueError("this BERT has no classifier; build it with num_labels > 0.")
        rngs = split_key(dropout_rng, 2)
        pooled = self.pool(self.encode(tokens, dropout_rng=rngs[0], **kwargs))
        return self.classifier(ops.dropout(pooled, self.cfg.dropout_rate, rngs[1]))

    def __call__(self, tokens: Int[Array, "B T"] | None = None, **kwargs) -> Float[Array, "B T V"]:
        """Masked-LM logits [B, T, V]; keyword arguments as in `encode`."""
        return self.mlm_logits(self.encode(tokens, **kwargs))
