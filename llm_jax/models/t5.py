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
from llm_jax.models import _xla_cpu
from llm_jax.models.cache import KVCache
from llm_jax.models.config import ModelConfig
from llm_jax.models.init import init_scheme
from llm_jax.models.inputs import check_length, default_positions, embed_inputs, split_key
from llm_jax.models.layers import (
    Embed,
    block_spec,
    block_stack,
    make_norm,
    param,
    untied_lm_head,
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
        spec, init = block_spec(cfg), init_scheme(cfg)
        dtype, pdtype = spec.dtype, spec.param_dtype
        r, d = init.dense, cfg.d_model
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

        self.encoder_rel_bias = rel_table() if relative else None
        self.decoder_rel_bias = rel_table() if relative else None
        self.encoder = block_stack(cfg, spec, init, cfg.num_layers, rngs=rngs)
        self.decoder = block_stack(
            cfg, spec, init, cfg.num_decoder_layers, cross_attention=True, rngs=rngs
        )
        self.encoder_norm = make_norm(spec) if cfg.final_norm else None
        self.decoder_norm = make_norm(spec) if cfg.final_norm else None
        self.lm_head = untied_lm_head(cfg, spec, r, rngs)

    def _embed(
        self,
        tokens: Int[Array, "B T"] | None,
        inputs_embeds: Float[Array, "B T D"] | None,
        positions: Int[Array, "B T"] | None,
        offset: int | Int[Array, ""] = 0,
    ) -> Float[Array, "B T D"]:
        cfg = self.cfg
        x = embed_inputs(self.embed, tokens, inputs_embeds, dtype=jnp.dtype(cfg.dtype))
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

    def _rel_bias(
        self,
        table: nnx.Param | None,
        q_len: int,
        k_len: int,
        *,
        bidirectional: bool,
        q_offset: int | Int[Array, ""] = 0,
    ) -> Float[Array, "1 N T S"] | None:
        """The relative position bias of T queries (from `q_offset`) over S keys."""
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
        rngs = split_key(dropout_rng, 3)
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
        *,
        heads_major: bool | None = None,
    ) -> KVCache:
        """A decoding cache: empty self-attention slots and the cross-attention keys/values
        of `encoder_out`, computed once for every decoder layer.

        `heads_major` picks the cache layout (see `LayerKV`); None: the XLA:CPU layout on
        the CPU backend, else length-major.
        """
        cfg = self.cfg
        if cfg.position == "sinusoidal":
            check_length(max_length, cfg.max_position_embeddings, name="the cache")
        dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
        heads_major = _xla_cpu.use_cpu_tricks() if heads_major is None else heads_major
        memory = self.decoder.map_layers(
            lambda block: block.cross_attn.memory(encoder_out, heads_major=heads_major)
        )  # [L, B, ., ., H]
        shape = (cfg.num_decoder_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        s = encoder_out.shape[1]
        enc_valid = (
            jnp.ones((batch_size, s), bool)
            if encoder_segment_ids is None
            else encoder_segment_ids != 0
        )
        return KVCache.empty(
            shape,
            dtype,
            heads_major=heads_major,
            cross_kv=jax.tree.map(lambda a: a.astype(dtype), memory),
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
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B T V"]:
        """Teacher-forced decoder logits [B, T, V] over `encoder_out` [B, S, D].

        Pass `encoder_segment_ids` for padded or packed encoder rows: with decoder
        `segment_ids` too, cross-attention stays within equal segment ids; with encoder ids
        only, it skips encoder padding. See `decode_step` for cached decoding.
        """
        if encoder_out is None:
            raise ValueError("decode needs encoder_out (use decode_step with a cache).")
        x = self._embed(tokens, inputs_embeds, positions)
        t = x.shape[1]
        rngs = split_key(dropout_rng, 3)
        x = ops.dropout(x, self.cfg.dropout_rate, rngs[0])
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
        return self._head(x, rngs[2])

    def decode_step(
        self,
        tokens: Int[Array, "B T"],
        cache: KVCache,
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T V"], KVCache]:
        """Decoder logits [B, T, V] of T new tokens appended to `cache` (from `init_cache`),
        and the updated cache."""
        x = self._embed(tokens, None, positions, cache.index)
        t = x.shape[1]
        mask, valid = cache.step(t, segment_ids)
        bias = self._rel_bias(
            self.decoder_rel_bias, t, cache.max_length, bidirectional=False, q_offset=cache.index
        )
        x, self_kv = self.decoder(
            x,
            mask=mask,
            bias=bias,
            memory=cache.cross_kv,
            cross_mask=cache.encoder_valid[:, None, None, :],
            cache=cache.self_kv,
            index=cache.index,
        )
        cache = cache.replace(self_kv=self_kv, valid=valid, index=cache.index + t)
        return self._head(x, None), cache

    def _head(self, x: Float[Array, "B T D"], rng: jax.Array | None) -> Float[Array, "B T V"]:
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        x = ops.dropout(x, self.cfg.dropout_rate, rng)
        return constrain(self.logits(x), ("batch", "length", "vocab"))

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
        rngs = split_key(dropout_rng, 2)
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
