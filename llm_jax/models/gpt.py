"""Decoder-only causal language model: GPT-2 (Radford et al. 2019) and LLaMA via config.

GPT-2: learned positions, pre-LayerNorm, GELU-tanh MLP, biases, tied embeddings.
LLaMA: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, untied head.
With `num_labels > 0` a sequence-classification head reads the last real token
(`classify`, as transformers' GPT2/LlamaForSequenceClassification).

Shape letters: B batch, T length, S cache length, D model dim, V vocab, L layers, C classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from llm_jax import ops
from llm_jax.models import _xla_cpu
from llm_jax.models.attention_impl import AttentionMask
from llm_jax.models.cache import KVCache
from llm_jax.models.config import ModelConfig
from llm_jax.models.init import init_scheme
from llm_jax.models.inputs import (
    check_length,
    default_positions,
    embed_inputs,
    is_traced,
    split_key,
)
from llm_jax.models.layers import (
    Einsum,
    Embed,
    block_spec,
    block_stack,
    lookup_table,
    make_norm,
    param,
    untied_lm_head,
)
from llm_jax.parallel.rules import constrain


def last_token_index(segment_ids: Int[Array, "B T"] | None, length: int) -> Int[Array, " B"]:
    """Index of each row's last real token: the last position with segment id > 0 (the
    right end of a right-padded row); T - 1 when `segment_ids` is None (no padding) or a
    row is all padding."""
    if segment_ids is None:
        return jnp.full((1,), length - 1, jnp.int32)
    real = jnp.flip(segment_ids > 0, axis=1)  # [B, T], last position first
    return (length - 1 - jnp.argmax(real, axis=1)).astype(jnp.int32)


class GPT(nnx.Module):
    """A causal language model. `model(tokens)` returns next-token logits [B, T, V];
    `classify` class logits [B, C] when the config has `num_labels > 0`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family != "gpt":
            raise ValueError(f"GPT needs a config with family='gpt'; got {cfg.family!r}.")
        self.cfg = cfg
        spec, init = block_spec(cfg), init_scheme(cfg)
        dtype, pdtype = spec.dtype, spec.param_dtype
        r = init.dense
        self.embed = Embed(
            cfg.vocab_size,
            cfg.d_model,
            std=r,
            dtype=dtype,
            param_dtype=pdtype,
            quant=spec.quant,
            rngs=rngs,
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
        self.layers = block_stack(cfg, spec, init, cfg.num_layers, rngs=rngs)
        self.final_norm = make_norm(spec) if cfg.final_norm else None
        self.lm_head = untied_lm_head(cfg, spec, r, rngs)
        # HF's `score`: a bias-free [D, C] projection of the last real token's hidden state.
        self.classifier = (
            Einsum(
                "BD,DC->BC",
                (cfg.d_model, cfg.num_labels),
                ("embed", "classes"),
                std=r,
                dtype=dtype,
                param_dtype=pdtype,
                rngs=rngs,
            )
            if cfg.num_labels
            else None
        )

    def init_cache(
        self, batch_size: int, max_length: int, dtype=None, *, heads_major: bool | None = None
    ) -> KVCache:
        """An empty static-size cache for decoding up to `max_length` positions.

        `heads_major` picks the cache layout (see `LayerKV`); None: the XLA:CPU layout on
        the CPU backend, else length-major.
        """
        cfg = self.cfg
        if cfg.position == "learned":
            check_length(max_length, cfg.max_position_embeddings, name="the cache")
        dtype = jnp.dtype(cfg.dtype) if dtype is None else dtype
        heads_major = _xla_cpu.use_cpu_tricks() if heads_major is None else heads_major
        shape = (cfg.num_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        return KVCache.empty(shape, dtype, heads_major=heads_major)

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
            written at `cache.index`. None: a full forward pass (returns None for it).
          dropout_rng: a PRNG key turns dropout on (training); None is eval mode.
        """
        cfg = self.cfg
        x = embed_inputs(self.embed, tokens, inputs_embeds, dtype=jnp.dtype(cfg.dtype))
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
        rngs = split_key(dropout_rng, 2)
        x = constrain(ops.dropout(x, cfg.dropout_rate, rngs[0]), ("batch", "length", "embed"))

        if cache is None:
            # Its dense part is today's mask; fused kernels read the structure instead.
            mask = AttentionMask.of(t, causal=True, segment_ids=segment_ids)
            x, _ = self.layers(x, mask=mask, positions=positions, dropout_rng=rngs[1])
        else:
            mask, valid = cache.step(t, segment_ids)
            x, self_kv = self.layers(
                x,
                mask=mask,
                positions=positions,
                cache=cache.self_kv,
                index=cache.index,
                dropout_rng=rngs[1],
            )
            cache = cache.replace(self_kv=self_kv, valid=valid, index=cache.index + t)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, cache

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """Project hidden states to vocabulary logits (tied or untied head)."""
        if self.lm_head is None:
            logits = self.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(
        self,
        tokens: Int[Array, "B T"] | None = None,
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
        inputs_embeds: Float[Array, "B T D"] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B T V"]:
        """Next-token logits [B, T, V] of a full forward pass; see `features` for the
        arguments and `decode_step` for cached decoding."""
        hidden, _ = self.features(
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            inputs_embeds=inputs_embeds,
            dropout_rng=dropout_rng,
        )
        return self.logits(hidden)

    def classify(
        self,
        tokens: Int[Array, "B T"] | None = None,
        *,
        segment_ids: Int[Array, "B T"] | None = None,
        positions: Int[Array, "B T"] | None = None,
        token_type_ids: Int[Array, "B T"] | None = None,
        dropout_rng: jax.Array | None = None,
        inputs_embeds: Float[Array, "B T D"] | None = None,
    ) -> Float[Array, "B C"]:
        """Sequence-classification logits [B, num_labels] from the hidden state of each
        row's last real token (see `last_token_index`), which in a causal model is the only
        one that has seen the whole text.

        Args:
          tokens, positions, inputs_embeds, dropout_rng: as in `features`.
          segment_ids: [B, T], 0 on the right padding (a Hugging Face attention mask);
            None: every position is real.
          token_type_ids: ignored (GPT has no token types); accepted so that one loss
            classifies with BERT and GPT alike.
        """
        del token_type_ids
        if self.classifier is None:
            raise ValueError("this GPT has no classification head; build it with num_labels > 0.")
        hidden, _ = self.features(
            tokens,
            positions=positions,
            segment_ids=segment_ids,
            inputs_embeds=inputs_embeds,
            dropout_rng=dropout_rng,
        )
        last = last_token_index(segment_ids, hidden.shape[1])  # [B] (or [1])
        index = jnp.broadcast_to(last, hidden.shape[:1])[:, None, None]
        pooled = jnp.take_along_axis(hidden, index, axis=1)[:, 0]  # [B, D]
        return self.classifier(pooled)

    def decode_step(
        self,
        tokens: Int[Array, "B T"],
        cache: KVCache,
        *,
        positions: Int[Array, "B T"] | None = None,
        segment_ids: Int[Array, "B T"] | None = None,
    ) -> tuple[Float[Array, "B T V"], KVCache]:
        """Logits [B, T, V] of T new tokens appended to `cache`, and the updated cache.

        A prefill passes the whole (left-padded) prompt, a decode step one token per row;
        `positions` and `segment_ids` are as in `features`.
        """
        hidden, cache = self.features(
            tokens, positions=positions, segment_ids=segment_ids, cache=cache
        )
        return self.logits(hidden), cache
