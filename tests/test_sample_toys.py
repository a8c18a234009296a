"""Toy decoders with known answers for the decoding-engine tests, and their NumPy twins.

The other `test_sample*.py` files import these. The tests here check the toys themselves:
prefill + cached one-token steps give the same logits as a full uncached forward, and the
NumPy twins give the same logits as the JAX toys.

- `HistoryToy`: next-token logits = table[(3 * sum(tokens so far) + position) % M]. The
  answer depends on every earlier real token and on the position, through the cache, so
  wrong left padding, positions, segment masking or beam cache reorders all change it.
  Its cache mimics the GPT KV-cache layout: `tokens [2, B, S]` (batch at axis 1, like
  `k/v [L, B, K, S, H]`), `valid [B, S]` (batch at axis 0) and a scalar write `index`;
  its `take_rows` gathers each along its own batch axis.
- `MarkovToy`: next-token logits = table[last token], a first-order Markov chain; its
  cache holds only the write index (no batch axis anywhere). With identical rows it is a
  constant distribution (sampling tests); with one-hot rows a deterministic rule.
- `EncDecToy`: an encoder–decoder: the cache stores the sum of the encoder tokens and the
  logits are table[(last token + encoder sum) % V].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Float

from llm_jax.sample import DecoderInfo

HISTORY_MODULUS = 31


@struct.dataclass
class HistoryToy:
    """logits(next | seq) = table[(3 * sum(seq) + len(seq) - 1) % M]; table [M, V]."""

    table: Float[Array, "M V"]

    @property
    def info(self) -> DecoderInfo:
        return DecoderInfo(vocab_size=self.table.shape[1])

    def take_rows(self, cache: dict, rows) -> dict:
        return {
            "tokens": jnp.take(cache["tokens"], rows, axis=1),
            "valid": jnp.take(cache["valid"], rows, axis=0),
            "index": cache["index"],
        }

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        return {
            "tokens": jnp.zeros((2, batch_size, max_length), jnp.int32),
            "valid": jnp.zeros((batch_size, max_length), bool),
            "index": jnp.zeros((), jnp.int32),
        }

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        b, t = tokens.shape
        index = cache["index"]
        written = jax.lax.dynamic_update_slice(
            cache["tokens"], jnp.broadcast_to(tokens, (2, b, t)), (0, 0, index)
        )  # [2, B, S]
        valid = jax.lax.dynamic_update_slice(cache["valid"], segment_ids != 0, (0, index))
        slots = jnp.arange(written.shape[-1])
        causal = slots[None, :] <= index + jnp.arange(t)[:, None]  # [T, S]
        history = jnp.where(valid, written[1], 0)  # [B, S]
        prefix = jnp.einsum("BS,TS->BT", history, causal.astype(jnp.int32))  # [B, T]
        h = (3 * prefix + positions) % self.table.shape[0]
        logits = self.table[h]  # [B, T, V]
        return logits, {"tokens": written, "valid": valid, "index": index + t}


def history_logits_np(table: np.ndarray, seq: list[int]) -> np.ndarray:
    """NumPy twin of HistoryToy: the next-token logits [V] after `seq` (prompt + generated)."""
    return np.asarray(table, np.float64)[(3 * sum(seq) + len(seq) - 1) % table.shape[0]]


@struct.dataclass
class MarkovToy:
    """logits(next | seq) = table[seq[-1]]; table [V, V]."""

    table: Float[Array, "V V"]

    @property
    def info(self) -> DecoderInfo:
        return DecoderInfo(vocab_size=self.table.shape[1])

    def take_rows(self, cache: dict, rows) -> dict:
        del rows  # no batch axis anywhere
        return cache

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        del batch_size, max_length
        return {"index": jnp.zeros((), jnp.int32)}

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        del positions, segment_ids
        return self.table[tokens], {"index": cache["index"] + tokens.shape[1]}


def markov_logits_np(table: np.ndarray, seq: list[int]) -> np.ndarray:
    return np.asarray(table, np.float64)[seq[-1]]


@struct.dataclass
class EncDecToy:
    """Encoder–decoder toy: logits(next) = table[(last decoder token + sum(encoder)) % V]."""

    table: Float[Array, "V V"]
    decoder_start_id: int = struct.field(pytree_node=False, default=0)

    @property
    def info(self) -> DecoderInfo:
        return DecoderInfo(vocab_size=self.table.shape[1], decoder_start_id=self.decoder_start_id)

    def take_rows(self, cache: dict, rows) -> dict:
        return {**cache, "encoder_sum": jnp.take(cache["encoder_sum"], rows, axis=0)}

    def init_cache(self, batch_size, max_length, encoder_tokens, encoder_segment_ids):
        del max_length
        encoder_sum = jnp.sum(encoder_tokens * encoder_segment_ids, axis=-1)  # [B]
        assert encoder_sum.shape == (batch_size,)
        return {"encoder_sum": encoder_sum, "index": jnp.zeros((), jnp.int32)}

    def tokens_to_logits(self, tokens, positions, segment_ids, cache):
        del positions, segment_ids
        state = (tokens + cache["encoder_sum"][:, None]) % self.table.shape[0]
        return self.table[state], {**cache, "index": cache["index"] + tokens.shape[1]}


def random_table(seed: int, rows: int, vocab: int, eos_boost: float = 0.0) -> np.ndarray:
    """A float32 logits table [rows, vocab] with distinct entries; EOS (id 1) boosted."""
    table = np.random.default_rng(seed).normal(size=(rows, vocab)).astype(np.float32) * 2.0
    table[:, 1] += eos_boost
    return table


def log_softmax_np(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.sum(np.exp(x - m)))


# Tests of the toys themselves --------------------------------------------------------------


def _full_forward(decoder, seq: list[int]) -> np.ndarray:
    """Uncached forward: the whole sequence in one call on a fresh cache; logits [T, V]."""
    tokens = jnp.asarray([seq], jnp.int32)
    cache = decoder.init_cache(1, len(seq))
    positions = jnp.arange(len(seq), dtype=jnp.int32)[None]
    logits, _ = decoder.tokens_to_logits(tokens, positions, jnp.ones_like(tokens), cache)
    return np.asarray(logits[0])


def test_history_toy_cached_steps_equal_full_forward_and_numpy_twin():
    toy = HistoryToy(jnp.asarray(random_table(0, HISTORY_MODULUS, 12)))
    seq = [3, 7, 1, 0, 11, 5, 2, 9]
    full = _full_forward(toy, seq)
    # Left-padded prefill of the first 3 tokens, then one token per call.
    pad = 4
    tokens = jnp.asarray([[0] * pad + seq[:3]], jnp.int32)
    segments = jnp.asarray([[0] * pad + [1] * 3], jnp.int32)
    positions = jnp.asarray([[0] * pad + [0, 1, 2]], jnp.int32)
    cache = toy.init_cache(1, pad + len(seq))
    logits, cache = toy.tokens_to_logits(tokens, positions, segments, cache)
    steps = [np.asarray(logits[0, -1])]
    for i in range(3, len(seq)):
        one = jnp.asarray([[seq[i]]], jnp.int32)
        logits, cache = toy.tokens_to_logits(one, jnp.asarray([[i]]), jnp.ones_like(one), cache)
        steps.append(np.asarray(logits[0, 0]))
    np.testing.assert_array_equal(np.stack(steps), full[2:])
    for i in range(len(seq)):
        np.testing.assert_allclose(full[i], history_logits_np(toy.table, seq[: i + 1]))


def test_markov_and_encdec_toys_match_numpy_twins():
    table = random_table(1, 6, 6)
    seq = [2, 4, 5, 0]
    full = _full_forward(MarkovToy(jnp.asarray(table)), seq)
    for i in range(len(seq)):
        np.testing.assert_allclose(full[i], markov_logits_np(table, seq[: i + 1]))
    toy = EncDecToy(jnp.asarray(table))
    enc = jnp.asarray([[3, 4, 9]]), jnp.asarray([[1, 1, 0]])
    cache = toy.init_cache(1, 4, *enc)
    logits, _ = toy.tokens_to_logits(jnp.asarray([[2]]), None, None, cache)
    np.testing.assert_allclose(logits[0, 0], table[(2 + 7) % 6])
