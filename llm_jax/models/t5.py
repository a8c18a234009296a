"""Encoder–decoder: T5 (Raffel et al. 2020) and the original Transformer via config.

T5: shared embeddings, relative position bias (one table per stack, shared by its layers),
RMSNorm, no biases, ReLU (v1.0) or gated-GELU (v1.1) MLP, no 1/sqrt(H) attention scaling,
tied head with logits scaled by D^-0.5 (v1.0) or an untied head (v1.1).
Transformer (Vaswani et al. 2017): sinusoidal positions, embeddings scaled by sqrt(D),
post-LayerNorm, ReLU MLP, biases (preset `transformer-base`).

Shape letters: B batch, T decoder length, S encoder length (cache length when decoding),
D model dim, N heads, K kv heads, H head dim, U relative-position buckets, V vocab, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from llm_jax import ops
from llm_jax.models.common import (
    KVCache,
    cache_step,
    check_length,
    check_tokens,
    default_positions,
    empty_kv,
)
from llm_jax.models.config import ModelConfig
from llm_jax.models.layers import (
    Block,
    Einsum,
    Embed,
    Norm,
    Stack,
    length_to_heads_major,
    param,
)
from llm_jax.parallel.rules import constrain


class T5(nnx.Module):
    """`model(encoder_tokens, decoder_tokens)` returns decoder logits [B, T, V].

    Decoder inputs are the targets shifted right with the decoder start token (T5: pad id 0)
    first; the data pipeline builds them.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "t5":
            raise ValueError(f"T5 needs a config with family='t5'; got {cfg.family!r}.")
        self.cfg = cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        r, d = cfg.initializer_range, cfg.d_model
        relative = cfg.position == "relative"
        self.embed = Embed(cfg.vocab_size, d, std=r, dtype=dtype, param_dtype=pdtype, rngs=rngs)

        def rel_table():
            return param(
                rngs,
                (cfg.relative_num_buckets, cfg.num_heads),
                ("buckets", "heads"),
                std=r * d**-0.5,
                dtype=pdtype,
            )

        def norm():
            return Norm(
                d, kind=cfg.norm, eps=cfg.norm_eps, use_bias=cfg.use_bias, param_dtype=pdtype
            )

        self.encoder_rel_bias = rel_table() if relative else None
        self.decoder_rel_bias = rel_table() if relative else None
        self.encoder = Stack(
            lambda r_: Block(cfg, cross_attention=False, rngs=r_),
            cfg.num_layers,
            scan=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            shared=False,
            rngs=rngs,
        )
        self.decoder = Stack(
            lambda r_: Block(cfg, cross_attention=True, rngs=r_),
            cfg.decoder_layers,
            scan=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            shared=False,
            rngs=rngs,
        )
        self.encoder_norm = norm() if cfg.final_norm else None
        self.decoder_norm = norm() if cfg.final_norm else None
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Einsum(
                "BTD,DV->BTV",
                (d, cfg.vocab_size),
                ("embed", "vocab"),
                std=r,
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
        )

    def _embed(self, tokens, inputs_embeds, positions, offset=0):
        cfg = self.cfg
        if inputs_embeds is None:
            if tokens is None:
                raise ValueError("pass tokens [B, T] or inputs_embeds [B, T, D].")
            check_tokens(tokens, cfg.vocab_size)
            x = self.embed(tokens)
        else:
            x = inputs_embeds.astype(jnp.dtype(cfg.dtype))
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if cfg.position == "sinusoidal":
            b, t = x.shape[:2]
            if positions is None:
                positions = default_positions(b, t, offset)
            table = ops.sinusoidal_positions(cfg.max_position_embeddings, cfg.d_model)
            ops.check_positions(positions, cfg.max_position_embeddings)
            x = x + ops.learned_positions(table, positions).astype(x.dtype)
        return constrain(x, ("batch", "length", "embed"))

    def _rel_bias(self, table, q_len, k_len, *, bidirectional, q_offset=0):
        if table is None:
            return None
        q_pos = jnp.arange(q_len)[None] + q_offset  # [1, T]
        k_pos = jnp.arange(k_len)[None]  # [1, S]
        return ops.t5_relative_position_bias(
            table[...],
            q_pos,
            k_pos,
            bidirectional=bidirectional,
            max_distance=self.cfg.relative_max_distance,
        )  # [1, N, T, S]

    def encode(
        self,
        tokens: Int[Array, "B S"] | None = None,
        *,
        segment_ids: Int[Array, "B S"] | None = None,
        positions: Int[Array, "B S"] | None = None,
        inputs_embeds: Float[Array, "B S D"] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B S D"]:
        """Encoder output [B, S, D]. `segment_ids` 0 marks padding; packed rows use 1, 2, ..."""
        cfg = self.cfg
        x = self._embed(tokens, inputs_embeds, positions)
        s = x.shape[1]
        rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        x = ops.dropout(x, cfg.dropout_rate, rngs[0])
        mask = None if segment_ids is None else ops.segment_mask(segment_ids)
        bias = self._rel_bias(self.encoder_rel_bias, s, s, bidirectional=True)
        x, _ = self.encoder(x, mask=mask, bias=bias, dropout_rng=rngs[1])
        if self.encoder_norm is not None:
            x = self.encoder_norm(x)
        return ops.dropout(x, cfg.dropout_rate, rngs[2])

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        encoder_out: Float[Array, "B S D"],
        encoder_segment_ids: Int[Array, "B S"] | None = None,
        dtype=None,
    ) -> KVCache:
        """A decoding cache: empty self-attention slots and the cross-attention keys/values
        of `encoder_out`, computed once for every decoder layer."""
        cfg = self.cfg
        if cfg.position == "sinusoidal":
            check_length(max_length, cfg.max_position_embeddings, name="the cache")
        dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
        graphdef, state = nnx.split(self.decoder.blocks)

        def cross_kv(layer_state):
            k, v = nnx.merge(graphdef, layer_state).cross_attn.project_kv(encoder_out)
            return length_to_heads_major(k), length_to_heads_major(v)

        cross_k, cross_v = jax.vmap(cross_kv)(state)  # [L, B, K, S, H] each
        layers = empty_kv(
            cfg.decoder_layers, batch_size, max_length, cfg.kv_heads, cfg.head_size, dtype
        )
        layers.update(cross_k=cross_k.astype(dtype), cross_v=cross_v.astype(dtype))
        s = encoder_out.shape[1]
        enc_valid = (
            jnp.ones((batch_size, s), bool)
            if encoder_segment_ids is None
            else encoder_segment_ids != 0
        )
        return KVCache(
            layers=layers,
            valid=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
            encoder_valid=enc_valid,
        )

    def decode(
        self,
        tokens: Int[Array, "B T"] | None = None,
        encoder_out: Float[Array, "B S D"] | None = None,
        *,
        encoder_segment_ids: Int[Array, "B S"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        inputs_embeds: Float[Array, "B T D"] | None = None,
        cache: KVCache | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B T V"] | tuple[Float[Array, "B T V"], KVCache]:
        """Decoder logits [B, T, V]; `(logits, cache)` when decoding with a cache.

        Without a cache pass `encoder_out` (and `encoder_segment_ids` for padded or packed
        encoder rows: with decoder `segment_ids` too, cross-attention stays within equal
        segment ids; with encoder ids only, it skips encoder padding).
        """
        cfg = self.cfg
        offset = 0 if cache is None else cache.index
        x = self._embed(tokens, inputs_embeds, positions, offset)
        t = x.shape[1]
        rngs = [None] * 3 if dropout_rng is None else list(jax.random.split(dropout_rng, 3))
        x = ops.dropout(x, cfg.dropout_rate, rngs[0])
        if cache is None:
            if encoder_out is None:
                raise ValueError("decode without a cache needs encoder_out.")
            mask = ops.combine_masks(
                ops.causal_mask(t), None if segment_ids is None else ops.segment_mask(segment_ids)
            )
            if encoder_segment_ids is None:
                cross = None
            elif segment_ids is None:
                cross = (encoder_segment_ids != 0)[:, None, None, :]
            else:
                cross = ops.segment_mask(segment_ids, encoder_segment_ids)
            bias = self._rel_bias(self.decoder_rel_bias, t, t, bidirectional=False)
            x, _ = self.decoder(
                x,
                mask=mask,
                bias=bias,
                encoder_out=encoder_out,
                cross_mask=cross,
                dropout_rng=rngs[1],
            )
            new_cache = None
        else:
            mask, valid = cache_step(cache, t, segment_ids)
            bias = self._rel_bias(
                self.decoder_rel_bias,
                t,
                cache.max_length,
                bidirectional=False,
                q_offset=cache.index,
            )
            cross = cache.encoder_valid[:, None, None, :]
            x, layers = self.decoder(
                x,
                mask=mask,
                bias=bias,
                cross_mask=cross,
                cache=cache.layers,
                cache_index=cache.index,
                dropout_rng=rngs[1],
            )
            new_cache = cache.replace(layers=layers, valid=valid, index=cache.index + t)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        x = ops.dropout(x, cfg.dropout_rate, rngs[2])
        logits = constrain(self.logits(x), ("batch", "length", "vocab"))
        return logits if cache is None else (logits, new_cache)

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Vocabulary logits: tied (scaled by D^-0.5 for T5 v1.0) or untied head."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self.cfg.scale_tied_logits:
            hidden = hidden * jnp.asarray(self.cfg.d_model**-0.5, hidden.dtype)
        return self.embed.attend(hidden)

    def __call__(
        self,
        encoder_tokens: Int[Array, "B S"],
        decoder_tokens: Int[Array, "B T"],
        *,
        encoder_segment_ids: Int[Array, "B S"] | None = None,
        decoder_segment_ids: Int[Array, "B T"] | None = None,
        encoder_positions: Int[Array, "B S"] | None = None,
        decoder_positions: Int[Array, "B T"] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B T V"]:
        """Teacher-forced decoder logits [B, T, V] for a batch of (source, target) pairs."""
        rngs = [None, None] if dropout_rng is None else list(jax.random.split(dropout_rng))
        enc = self.encode(
            encoder_tokens,
            segment_ids=encoder_segment_ids,
            positions=encoder_positions,
            dropout_rng=rngs[0],
        )
        return self.decode(
            decoder_tokens,
            enc,
            encoder_segment_ids=encoder_segment_ids,
            segment_ids=decoder_segment_ids,
            positions=decoder_positions,
            dropout_rng=rngs[1],
        )
