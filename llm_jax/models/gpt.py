"""Decoder-only causal language model: GPT-2 (Radford et al. 2019) and LLaMA via config.

GPT-2: learned positions, pre-LayerNorm, GELU-tanh MLP, biases, tied embeddings.
LLaMA: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head.

Shape letters: B batch, T length, S cache length, D model dim, V vocab, L layers.
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
    is_traced,
)
from llm_jax.models.config import ModelConfig
from llm_jax.models.layers import Block, Einsum, Embed, Norm, Stack, lookup_table, param
from llm_jax.parallel.rules import constrain


class GPT(nnx.Module):
    """A causal language model. `model(tokens)` returns next-token logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "gpt":
            raise ValueError(f"GPT needs a config with family='gpt'; got {cfg.family!r}.")
        self.cfg = cfg
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        r = cfg.initializer_range
        self.embed = Embed(
            cfg.vocab_size, cfg.d_model, std=r, dtype=dtype, param_dtype=pdtype, rngs=rngs
        )
        self.pos_embed = (
            param(
                rngs,
                (cfg.max_position_embeddings, cfg.d_model),
                ("positions", "embed"),
                std=r / 2,
                dtype=pdtype,
            )
            if cfg.position == "learned"
            else None
        )
        self.layers = Stack(
            lambda r_: Block(cfg, cross_attention=False, rngs=r_),
            cfg.num_layers,
            scan=cfg.scan_layers,
            remat_policy=cfg.remat_policy,
            shared=False,
            rngs=rngs,
        )
        self.final_norm = (
            Norm(
                cfg.d_model,
                kind=cfg.norm,
                eps=cfg.norm_eps,
                use_bias=cfg.use_bias,
                param_dtype=pdtype,
            )
            if cfg.final_norm
            else None
        )
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else Einsum(
                "BTD,DV->BTV",
                (cfg.d_model, cfg.vocab_size),
                ("embed", "vocab"),
                std=r,
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty static-size cache for decoding up to `max_length` positions."""
        cfg = self.cfg
        if cfg.position == "learned":
            check_length(max_length, cfg.max_position_embeddings, name="the cache")
        dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
        return KVCache(
            layers=empty_kv(
                cfg.num_layers, batch_size, max_length, cfg.kv_heads, cfg.head_size, dtype
            ),
            valid=jnp.zeros((batch_size, max_length), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def features(
        self,
        tokens: Int[Array, "B T"] | None = None,
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        inputs_embeds: Float[Array, "B T D"] | None = None,
        cache: KVCache | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[Float[Array, "B T D"], KVCache | None]:
        """Final hidden states [B, T, D] (after the final norm) and the updated cache.

        Args:
          tokens: token ids [B, T]; or pass `inputs_embeds` [B, T, D] instead (soft prompts).
          positions: absolute positions [B, T]; default 0..T-1 (after the cache's filled
            slots when decoding). Packed rows pass positions restarting per document.
          segment_ids: [B, T] document ids of packed rows; 0 marks padding. Tokens attend
            only within their segment. None means one document per row, no padding.
          cache: a `KVCache` from `init_cache` to decode incrementally; new keys/values are
            written at `cache.index`.
          dropout_rng: a PRNG key turns dropout on (training); None is eval mode.
        """
        cfg = self.cfg
        if inputs_embeds is None:
            if tokens is None:
                raise ValueError("pass tokens [B, T] or inputs_embeds [B, T, D].")
            check_tokens(tokens, cfg.vocab_size)
            x = self.embed(tokens)  # [B, T, D]
        else:
            x = inputs_embeds.astype(jnp.dtype(cfg.dtype))
        b, t = x.shape[:2]
        if positions is None:
            positions = default_positions(b, t, 0 if cache is None else cache.index)
        if self.pos_embed is not None:
            if cache is None:
                check_length(t, cfg.max_position_embeddings)
            if not is_traced(positions):
                ops.check_positions(positions, cfg.max_position_embeddings)
            table = lookup_table(self.pos_embed[...], "positions")
            x = x + ops.learned_positions(table, positions).astype(x.dtype)
        rngs = [None, None] if dropout_rng is None else list(jax.random.split(dropout_rng))
        x = constrain(ops.dropout(x, cfg.dropout_rate, rngs[0]), ("batch", "length", "embed"))

        if cache is None:
            mask = ops.combine_masks(
                ops.causal_mask(t), None if segment_ids is None else ops.segment_mask(segment_ids)
            )
            x, _ = self.layers(x, mask=mask, positions=positions, dropout_rng=rngs[1])
            new_cache = None
        else:
            mask, valid = cache_step(cache, t, segment_ids)
            x, layers = self.layers(
                x,
                mask=mask,
                positions=positions,
                cache=cache.layers,
                cache_index=cache.index,
                dropout_rng=rngs[1],
            )
            new_cache = cache.replace(layers=layers, valid=valid, index=cache.index + t)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, new_cache

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Project hidden states to vocabulary logits (tied or untied head)."""
        if self.lm_head is None:
            return self.embed.attend(hidden)
        return self.lm_head(hidden)

    def __call__(
        self,
        tokens: Int[Array, "B T"] | None = None,
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        inputs_embeds: Float[Array, "B T D"] | None = None,
        cache: KVCache | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B T V"] | tuple[Float[Array, "B T V"], KVCache]:
        """Next-token logits [B, T, V]; `(logits, cache)` when a cache is passed.

        See `features` for the arguments.
        """
        hidden, new_cache = self.features(
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            inputs_embeds=inputs_embeds,
            cache=cache,
            dropout_rng=dropout_rng,
        )
        logits = constrain(self.logits(hidden), ("batch", "length", "vocab"))
        return logits if cache is None else (logits, new_cache)
