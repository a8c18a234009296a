"""Prompt tuning (Lester et al. 2021): P learned vectors ahead of the input, the model frozen.

`llm_jax.models.build(cfg)` with `cfg.prompt_length = P > 0` builds the family's model
class extended by `PromptTuned` (`PromptTunedGPT`, `PromptTunedBERT`, `PromptTunedT5`).
Its parameter tree is the base model's, at the same paths, plus one top-level leaf
`prompt` [P, E] (E: the token-embedding width, D or ALBERT's factorised E) with logical
axes (None, "embed"); base parameters copy over by path.

The prompt enters through the base's `inputs_embeds`: x = [prompt; embed(tokens)].

- GPT (decoder-only) and T5's encoder: the P vectors go first, at positions 0..P-1.
- BERT-style encoders: right after the first ([CLS]) token, so the pooler still reads
  [CLS]; the prompt has token type 0.

Every token after the prompt moves P positions on. Each family overrides only the method
that embeds its input (GPT `features`, BERT and T5 `encode`), so every head reached through
it sees the prompt: LM logits, BERT's MLM/NSP heads and classifier, a GPT classifier.
GPT and BERT return hidden states (so per-token logits) without the prompt positions, the
shape of the targets. T5's encoder output keeps them, [B, P + S, D], because the decoder
cross-attends to the prompt; T5's `decode` and `init_cache` take the caller's S-long
`encoder_segment_ids` and extend them.

Packed rows: the prompt takes the segment id of the row's first token, so only the row's
first document attends to it; later documents of a packed row see no prompt. Prompt tuning
is meant for one example per row whose first token is real (right padding):
classification, instruction and seq2seq data.

Decoding: a prompt-tuned GPT's `init_cache(B, S)` returns a cache of S + P slots whose
first P slots already hold the prompt's keys/values; cached calls shift the caller's
positions by P. Left padding of a batch of prompts then sits between the soft prompt and
the real tokens, masked out, so `llm_jax.sample.generate` works unchanged.

Shape letters: B batch, T length, S encoder length, P prompt length, D model dim,
E embedding width, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from llm_jax.models.bert import BERT
from llm_jax.models.cache import KVCache
from llm_jax.models.config import ModelConfig
from llm_jax.models.gpt import GPT
from llm_jax.models.init import init_scheme
from llm_jax.models.inputs import embed_inputs
from llm_jax.models.layers import param
from llm_jax.models.t5 import T5

PROMPT_INITS = ("vocab", "labels", "random")
VOCAB_SAMPLE = 5000  # Lester et al. sample from the 5,000 most common tokens.
RANDOM_RANGE = 0.5  # Lester et al.'s random init: uniform on [-0.5, 0.5].


def check_prompt_fits(cfg: ModelConfig, length: int, *, name: str = "data.seq_len") -> None:
    """ValueError naming the fix unless `length` input tokens plus the P prompt vectors fit
    the model's position table (learned or sinusoidal; RoPE and T5 buckets are unbounded).

    Call it with the data's sequence length before compiling; the models call it too.
    """
    p, limit = cfg.prompt_length, cfg.max_position_embeddings
    if cfg.position in ("learned", "sinusoidal") and length + p > limit:
        raise ValueError(
            f"{name}={length} input tokens plus finetune.prompt_length={p} soft-prompt "
            f"vectors need {length + p} positions, but the model has max_position_embeddings="
            f"{limit}; lower {name} to at most {limit - p} or finetune.prompt_length to at "
            f"most {max(limit - length, 0)}."
        )


def _splice(x: Array, inserted: Array, at: int) -> Array:
    """x[:, :at], then `inserted`, then x[:, at:] along axis 1: [B, T, ...] -> [B, P + T, ...]."""
    return jnp.concatenate([x[:, :at], inserted.astype(x.dtype), x[:, at:]], axis=1)


def _prompt_positions(positions: Int[Array, "B T"], p: int, at: int) -> Int[Array, "B P+T"]:
    """Positions with P prompt positions spliced in at `at`, following the token before
    (or starting where the row starts); the tokens after the prompt move P on."""
    start = positions[:, at - 1 : at] + 1 if at else positions[:, :1]  # [B, 1]
    prompt = start + jnp.arange(p, dtype=positions.dtype)[None]  # [B, P]
    return jnp.concatenate([positions[:, :at], prompt, positions[:, at:] + p], axis=1)


class PromptTuned(nnx.Module):
    """What every prompt-tuned model adds to its base: the `prompt` [P, E] parameter and
    the splicing of it into the inputs (see the module docstring).

    A mixin: the concrete classes put it before the base class (`PromptTunedGPT(PromptTuned,
    GPT)`), so the base's parameters keep their paths and `isinstance(m, GPT)` holds.
    """

    insert_at: ClassVar[int] = 0  # the prompt goes before input position `insert_at`.
    cfg: ModelConfig
    embed: nnx.Module

    def _add_prompt(self, rngs: nnx.Rngs) -> None:
        """The fresh prompt [P, E], drawn like the embedding rows (`init_model_prompt`
        re-initialises it from the base's vocabulary once the base weights are in)."""
        cfg = self.cfg
        self.prompt = param(
            rngs,
            (cfg.prompt_length, cfg.embed_dim),
            (None, "embed"),
            std=init_scheme(cfg).dense,
            dtype=jnp.dtype(cfg.param_dtype),
        )

    @property
    def prompt_length(self) -> int:
        return self.cfg.prompt_length

    def prompt_embeds(self, batch_size: int) -> Float[Array, "B P E"]:
        """The prompt for every row, in the compute dtype."""
        p = self.prompt[...].astype(jnp.dtype(self.cfg.dtype))
        return jnp.broadcast_to(p[None], (batch_size, *p.shape))

    def _prompt_segments(self, segment_ids: Int[Array, "B T"] | None) -> Int[Array, "B P+T"]:
        """Segment ids with the prompt's spliced in: each row's first token's id."""
        if segment_ids is None:
            return None
        b, p = segment_ids.shape[0], self.prompt_length
        return _splice(segment_ids, jnp.broadcast_to(segment_ids[:, :1], (b, p)), self.insert_at)

    def _with_prompt(
        self,
        tokens: Int[Array, "B T"] | None,
        inputs_embeds: Float[Array, "B T E"] | None,
        *,
        positions: Int[Array, "B T"] | None,
        segment_ids: Int[Array, "B T"] | None,
        token_type_ids: Int[Array, "B T"] | None = None,
    ) -> dict[str, Array | None]:
        """The base method's input keywords for the P + T sequence with the prompt in it.

        `token_type_ids` (BERT): the prompt gets type 0; the key is left out when None.
        """
        cfg = self.cfg
        x = embed_inputs(self.embed, tokens, inputs_embeds, dtype=jnp.dtype(cfg.dtype), width="E")
        b, t = x.shape[:2]
        check_prompt_fits(cfg, t)
        p, at = self.prompt_length, self.insert_at
        out = {
            "inputs_embeds": _splice(x, self.prompt_embeds(b), at),
            "positions": None if positions is None else _prompt_positions(positions, p, at),
            "segment_ids": self._prompt_segments(segment_ids),
        }
        if token_type_ids is not None:
            zeros = jnp.zeros((b, p), token_type_ids.dtype)
            out["token_type_ids"] = _splice(token_type_ids, zeros, at)
        return out

    def _without_prompt(self, hidden: Float[Array, "B P+T D"]) -> Float[Array, "B T D"]:
        at, p = self.insert_at, self.prompt_length
        return jnp.concatenate([hidden[:, :at], hidden[:, at + p :]], axis=1)


class PromptTunedGPT(PromptTuned, GPT):
    """A `GPT` with a soft prompt ahead of every input (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self._add_prompt(rngs)

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
        """`GPT.features` of [prompt; input]: hidden states [B, T, D] of the input positions.

        With a cache (from `init_cache`, which already holds the prompt) nothing is
        prepended; given `positions` move P on, past the prompt.
        """
        if cache is not None:
            if positions is not None:
                positions = positions + self.prompt_length
            return super().features(
                tokens,
                positions=positions,
                segment_ids=segment_ids,
                inputs_embeds=inputs_embeds,
                cache=cache,
                dropout_rng=dropout_rng,
            )
        kw = self._with_prompt(tokens, inputs_embeds, positions=positions, segment_ids=segment_ids)
        hidden, _ = super().features(**kw, dropout_rng=dropout_rng)
        return self._without_prompt(hidden), None

    def init_cache(
        self, batch_size: int, max_length: int, dtype=None, *, heads_major: bool | None = None
    ) -> KVCache:
        """A cache for `max_length` tokens after the prompt: P + max_length slots, the first
        P filled with the prompt's keys/values (index P)."""
        check_prompt_fits(self.cfg, max_length, name="the decoding length")
        cache = super().init_cache(
            batch_size, max_length + self.prompt_length, dtype, heads_major=heads_major
        )
        _, cache = super().features(inputs_embeds=self.prompt_embeds(batch_size), cache=cache)
        return cache


class PromptTunedBERT(PromptTuned, BERT):
    """A `BERT` with a soft prompt right after the first ([CLS]) token."""

    insert_at = 1

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self._add_prompt(rngs)

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
        """`BERT.encode` of [CLS, prompt, rest]: hidden states [B, T, D] of the input
        positions ([CLS] first, for the pooler)."""
        kw = self._with_prompt(
            tokens,
            inputs_embeds,
            positions=positions,
            segment_ids=segment_ids,
            token_type_ids=token_type_ids,
        )
        return self._without_prompt(super().encode(**kw, dropout_rng=dropout_rng))


class PromptTunedT5(PromptTuned, T5):
    """A `T5` with a soft prompt ahead of the encoder input; the decoder attends to it."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self._add_prompt(rngs)

    def encode(
        self,
        tokens: Int[Array, "B S"] | None = None,
        *,
        segment_ids: Int[Array, "B S"] | None = None,
        positions: Int[Array, "B S"] | None = None,
        inputs_embeds: Float[Array, "B S D"] | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> Float[Array, "B P+S D"]:
        """`T5.encode` of [prompt; input]: [B, P + S, D], the prompt's outputs included."""
        kw = self._with_prompt(tokens, inputs_embeds, positions=positions, segment_ids=segment_ids)
        return super().encode(**kw, dropout_rng=dropout_rng)

    def decode(
        self,
        tokens: Int[Array, "B T"] | None = None,
        encoder_out: Float[Array, "B P+S D"] | None = None,
        *,
        encoder_segment_ids: Int[Array, "B S"] | None = None,
        **kwargs,
    ) -> Float[Array, "B T V"]:
        """`T5.decode` over this model's `encode` output; `encoder_segment_ids` [B, S] are
        the input's (the prompt's are added)."""
        segments = self._prompt_segments(encoder_segment_ids)
        return super().decode(tokens, encoder_out, encoder_segment_ids=segments, **kwargs)

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        encoder_out: Float[Array, "B P+S D"],
        encoder_segment_ids: Int[Array, "B S"] | None = None,
        dtype=None,
        *,
        heads_major: bool | None = None,
    ) -> KVCache:
        """`T5.init_cache` over this model's `encode` output; `encoder_segment_ids` [B, S]
        are the input's (the prompt's are added)."""
        segments = self._prompt_segments(encoder_segment_ids)
        return super().init_cache(
            batch_size, max_length, encoder_out, segments, dtype, heads_major=heads_major
        )


PROMPT_TUNED: dict[type, type[PromptTuned]] = {
    GPT: PromptTunedGPT,
    BERT: PromptTunedBERT,
    T5: PromptTunedT5,
}


def prompt_tuned_class(base: type) -> type[PromptTuned]:
    """The prompt-tuned variant of model class `base` (GPT, BERT or T5).

    Raises:
      ValueError: `base` cannot take `inputs_embeds`, so it cannot carry a soft prompt.
    """
    if base in PROMPT_TUNED:
        return PROMPT_TUNED[base]
    names = ", ".join(c.__name__ for c in PROMPT_TUNED)
    raise ValueError(
        f"prompt tuning feeds the soft prompt through the model's inputs_embeds, which "
        f"{base.__name__} cannot take (the models that can: {names}); use "
        "finetune.method=full or lora for this model, or set finetune.prompt_length=0."
    )


def _label_rows(table: np.ndarray, labels: Sequence[int | Sequence[int]]) -> np.ndarray:
    """One row per class label: its token's embedding, the mean over a multi-token label."""
    rows = []
    for label in labels:
        ids = np.atleast_1d(np.asarray(label, np.int64))
        if ids.size == 0 or ids.min() < 0 or ids.max() >= table.shape[0]:
            raise ValueError(
                f"class label token ids {ids.tolist()} must be non-empty ids in "
                f"[0, {table.shape[0]}); encode each label word with the model's tokenizer."
            )
        rows.append(table[ids].mean(axis=0))
    return np.stack(rows)


def _vocab_rows(table: np.ndarray, n: int, rng: np.random.Generator, exclude) -> np.ndarray:
    """`n` rows sampled uniformly (without replacement while there are enough) from the
    first min(V, 5000) ids, minus `exclude`."""
    pool = np.setdiff1d(np.arange(min(table.shape[0], VOCAB_SAMPLE)), np.asarray(exclude, int))
    if pool.size == 0:
        raise ValueError(
            "no ordinary token ids to sample a prompt from (every id below "
            f"{VOCAB_SAMPLE} is excluded as special); use finetune.prompt_init=random."
        )
    return table[rng.choice(pool, n, replace=n > pool.size)]


def init_prompt(
    embedding_table: Float[Array, "V E"],
    prompt_length: int,
    *,
    seed: int,
    method: str = "vocab",
    token_ids: Sequence[int | Sequence[int]] | None = None,
    exclude_ids: Sequence[int] = (),
) -> np.ndarray:
    """Lester et al.'s prompt initialisations, as a float32 [P, E] NumPy array.

    Args:
      embedding_table: the base model's token embeddings [V, E].
      prompt_length: P.
      seed: the sampling seed (vocab, labels, random).
      method: "vocab": rows of P tokens sampled uniformly from the first min(V, 5000)
        ids (Lester et al.: the 5,000 most common tokens; our tokenizers give frequent
        pieces low ids), leaving out `exclude_ids`; "labels": one row per class label of
        `token_ids` (the mean of a multi-token label's rows), the rest of the P rows
        sampled as for "vocab" (Lester et al.'s fallback); "random": uniform on
        [-0.5, 0.5] (Lester et al.).
      token_ids: "labels": each class label's token ids (an id or a list of ids each).
      exclude_ids: ids never sampled: the special tokens and sentinels (a tokenizer's
        `all_special_ids`).

    Raises:
      ValueError: an unknown method, P < 1, missing or out-of-range label ids, or more
        labels than P.
    """
    if method not in PROMPT_INITS:
        raise ValueError(f"finetune.prompt_init={method!r} is not one of {list(PROMPT_INITS)}.")
    if prompt_length < 1:
        raise ValueError(f"finetune.prompt_length={prompt_length} must be >= 1.")
    table = np.asarray(embedding_table, np.float32)
    rng = np.random.default_rng(seed)
    if method == "random":
        shape = (prompt_length, table.shape[1])
        return rng.uniform(-RANDOM_RANGE, RANDOM_RANGE, shape).astype(np.float32)
    if method == "vocab":
        return _vocab_rows(table, prompt_length, rng, exclude_ids)
    if not token_ids:
        raise ValueError(
            "finetune.prompt_init=labels needs the class labels' token ids; give the task's "
            "label words, or use finetune.prompt_init=vocab."
        )
    if len(token_ids) > prompt_length:
        raise ValueError(
            f"finetune.prompt_init=labels has {len(token_ids)} class labels for "
            f"finetune.prompt_length={prompt_length} prompt vectors; raise prompt_length to "
            f"at least {len(token_ids)} or use prompt_init=vocab."
        )
    labels = _label_rows(table, token_ids)
    rest = _vocab_rows(table, prompt_length - len(labels), rng, exclude_ids)
    return np.concatenate([labels, rest]).astype(np.float32)


def init_model_prompt(model: PromptTuned, method: str = "vocab", *, seed: int = 0, **kwargs):
    """Re-initialise `model.prompt` in place from its own embedding table (call it after
    the base weights are copied in); keywords as in `init_prompt`."""
    if not isinstance(model, PromptTuned):
        raise ValueError(
            f"{type(model).__name__} has no soft prompt; build it with prompt_length > 0."
        )
    table = model.embed.embedding[...]
    value = init_prompt(table, model.prompt_length, seed=seed, method=method, **kwargs)
    model.prompt[...] = jnp.asarray(value, model.prompt[...].dtype)
