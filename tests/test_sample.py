"""Greedy and sampling decoding, streaming, bucketing and argument checks, on toy decoders.

The toys (tests/test_sample_toys.py) have NumPy twins, so every expected output here is
computed by a plain Python loop over the twin's next-token logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sample_toys import (
    HISTORY_MODULUS,
    EncDecToy,
    HistoryToy,
    MarkovToy,
    history_logits_np,
    log_softmax_np,
    random_table,
)

import llm_jax.sample as sample
from llm_jax.sample import Beam, DecoderInfo, FunctionDecoder, Greedy, Sample
from llm_jax.sample.generate import Request, check_fits

V = 12
TABLE = random_table(0, HISTORY_MODULUS, V)
TOY = HistoryToy(jnp.asarray(TABLE))
PROMPTS = [[3, 7, 1], [5], [2, 9, 4, 4, 8, 10, 11, 0, 7], [1, 2]]
N = 8


def logits_np(seq):
    return history_logits_np(TABLE, seq)


def greedy_reference(prompt, n, eos=(), min_new=0, stops=()):
    """The generated ids of an argmax loop over the NumPy twin, ended like the engine."""
    seq, out = list(prompt), []
    for t in range(n):
        logits = logits_np(seq).copy()
        if t < min_new:
            logits[list(eos)] = -np.inf
        token = int(np.argmax(logits))
        out.append(token)
        seq.append(token)
        if token in eos or any(out[-len(s) :] == list(s) for s in stops if len(out) >= len(s)):
            break
    return out


def padded(rows, n, pad=0):
    return np.array([row + [pad] * (n - len(row)) for row in rows])


# Strategies and argument checks -------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Sample(top_p=0.0), "top_p"),
        (lambda: Sample(top_p=1.5), "top_p"),
        (lambda: Sample(temperature=-0.1), "temperature"),
        (lambda: Sample(top_k=-1), "top_k"),
        (lambda: Beam(num_beams=0), "num_beams"),
        (lambda: Beam(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (lambda: Beam(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    ],
)
def test_bad_strategy_params_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _untraceable(*args):
    raise AssertionError("the decoder was called: the check did not run before compiling")


UNTRACEABLE = FunctionDecoder(
    _untraceable, _untraceable, info=DecoderInfo(vocab_size=V, max_length=24)
)


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([[]], {}, "empty"),
        ([], {}, "empty batch"),
        ([[1, -2]], {}, "negative"),
        ([[1, V]], {}, "vocab_size"),
        (np.zeros((2, 3), np.float32), {}, "integers"),
        ([list(range(10)) * 2], {}, "max_length is 24"),
        ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens"),
        ([[1, 2]], {"min_new_tokens": 9}, "min_new_tokens"),
        ([[1, 2]], {"strategy": Sample()}, "rng="),
        ([[1, 2]], {"strategy": "greedy"}, "strategy"),
        ([[1, 2]], {"eos_id": -1}, "eos_id"),
        ([[1, 2]], {"stop_sequences": [[3], []]}, r"stop_sequences\[1\]"),
        ([[1, 2]], {"pad_id": -1}, "pad_id"),
        ([[1, 2]], {"max_length": 1}, "max_length must be"),
        ([[1] * 24], {}, "shorten the longest prompt to at most 23 tokens"),
    ],
)
def test_bad_arguments_raise_before_compiling(prompts, kwargs, match):
    kwargs = {"max_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample.generate(UNTRACEABLE, prompts, **kwargs)


def test_unknown_or_missing_keywords_are_type_errors_naming_the_valid_ones():
    with pytest.raises(TypeError, match=r"\['max_new_token'\].*'max_new_tokens'"):
        sample.generate(UNTRACEABLE, [[1]], max_new_token=4)
    with pytest.raises(TypeError, match="needs max_new_tokens="):
        sample.generate(UNTRACEABLE, [[1]])
    with pytest.raises(TypeError, match="return_log_probs"):
        sample.stream(UNTRACEABLE, [[1]], max_new_tokens=4, return_log_probs=True)


def test_request_normalises_the_strategy():
    assert Request(max_new_tokens=3).strategy == Greedy()
    assert Request(max_new_tokens=3, strategy=Sample(temperature=0.0)).strategy == Greedy()
    sampled = Sample(temperature=0.7)
    assert Request(max_new_tokens=3, strategy=sampled).strategy == sampled


def test_length_errors_name_the_fix_in_the_callers_words():
    check_fits(20, 4, 24)  # fits exactly
    check_fits(99, 4, None)  # no limit
    check_fits(24, 0, 24)  # an encoder input uses every position
    with pytest.raises(ValueError) as e:
        check_fits(20, 8, 24)
    assert str(e.value) == (
        "the longest prompt has 20 tokens and max_new_tokens is 8, 28 positions in all, but "
        "max_length is 24; lower max_new_tokens to at most 4 or shorten the longest prompt to "
        "at most 16 tokens."
    )
    with pytest.raises(ValueError) as e:
        check_fits(24, 1, 24, prompt="--prompt", limit="the model has {} positions")
    assert str(e.value) == (
        "--prompt has 24 tokens but the model has 24 positions; shorten --prompt to at most "
        "23 tokens."
    )
    with pytest.raises(ValueError) as e:
        check_fits(25, 0, 24, prompt="the input")
    assert str(e.value) == (
        "the input has 25 tokens but max_length is 24; shorten the input to at most 24 tokens."
    )
    with pytest.raises(ValueError) as e:
        check_fits(1, 30, 24, prompt="the start token")
    assert str(e.value).endswith("lower max_new_tokens to at most 23.")


def test_stream_rejects_beam_search():
    with pytest.raises(ValueError, match="generate"):
        sample.stream(UNTRACEABLE, [[1]], max_new_tokens=4, strategy=Beam(2))


def test_bucket_lengths():
    assert [sample.bucket_length(n) for n in (1, 15, 16, 17, 64, 65)] == [16, 16, 16, 32, 64, 128]
    assert sample.bucket_length(17, limit=20) == 20  # the cache still fits: shrink the bucket
    assert sample.bucket_length(12, limit=40) == 16


def test_function_decoder_takes_rows_on_axis_0_or_with_its_own_function():
    def cache_fn(batch, length):
        return {"k": jnp.arange(batch * 3.0).reshape(batch, 3), "index": jnp.int32(length)}

    cache = cache_fn(3, 10)
    rows = jnp.array([2, 2, 0])
    plain = FunctionDecoder(_untraceable, cache_fn)
    taken = plain.take_rows(cache, rows)
    np.testing.assert_array_equal(taken["k"], np.asarray(cache["k"])[[2, 2, 0]])
    assert int(taken["index"]) == 10  # a scalar has no batch axis: kept as it is

    def by_hand(c, r):
        return {**c, "k": jnp.take(c["k"], r, axis=1)}

    custom = FunctionDecoder(_untraceable, cache_fn, take_rows_fn=by_hand)
    np.testing.assert_array_equal(custom.take_rows(cache, jnp.array([1]))["k"], cache["k"][:, 1:2])


# Greedy ---------------------------------------------------------------------------------------


def test_greedy_follows_a_deterministic_rule():
    successor = MarkovToy(jnp.asarray(10.0 * np.eye(V, k=1) + 10.0 * np.eye(V, k=1 - V)))
    out = sample.generate(successor, [[3], [7, 9, 10]], max_new_tokens=5)
    np.testing.assert_array_equal(out.tokens, [[4, 5, 6, 7, 8], [11, 0, 1, 2, 3]])
    np.testing.assert_array_equal(out.lengths, [5, 5])
    assert not np.any(out.finished) and out.log_probs is None and out.scores is None


@jax.jit
def uncached_logits(tokens):
    """The whole [1, L] sequence through the toy on a fresh cache: no cache reuse."""
    positions = jnp.arange(tokens.shape[1])[None]
    cache = TOY.init_cache(1, tokens.shape[1])
    return TOY.tokens_to_logits(tokens, positions, jnp.ones_like(tokens), cache)[0][0]


def test_greedy_equals_argmax_loop_over_uncached_forwards():
    out = sample.generate(TOY, PROMPTS, max_new_tokens=N)
    for row, prompt in enumerate(PROMPTS):
        seq = list(prompt)
        for _ in range(N):
            # Right padding does not change causal logits; one fixed length, one compile.
            tokens = jnp.asarray([seq + [0] * (24 - len(seq))], jnp.int32)
            seq.append(int(jnp.argmax(uncached_logits(tokens)[len(seq) - 1])))
        np.testing.assert_array_equal(out.tokens[row], seq[len(prompt) :])
        assert seq[len(prompt) :] == greedy_reference(prompt, N)


def test_left_padded_batch_gives_each_prompt_its_own_result():
    batch = sample.generate(TOY, PROMPTS, max_new_tokens=N)
    for row, prompt in enumerate(PROMPTS):
        alone = sample.generate(TOY, [prompt], max_new_tokens=N)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])


def _eos_run(**kwargs):
    """Greedy with EOS and log-probs: one compiled program shared by the tests below."""
    eos = greedy_reference(PROMPTS[0], N)[2]  # row 0 ends after 3 tokens
    kwargs = {"max_new_tokens": N, "eos_id": eos, "return_log_probs": True, **kwargs}
    return eos, sample.generate(TOY, PROMPTS, **kwargs)


def test_eos_ends_a_row_and_pads_after_it():
    eos, out = _eos_run(pad_id=11)
    expected = [greedy_reference(p, N, eos=[eos]) for p in PROMPTS]
    assert len(expected[0]) == 3 and max(map(len, expected)) > 3
    np.testing.assert_array_equal(out.tokens, padded(expected, N, pad=11))
    np.testing.assert_array_equal(out.lengths, [len(e) for e in expected])
    np.testing.assert_array_equal(out.finished, [e[-1] == eos for e in expected])


def test_min_new_tokens_suppresses_eos_until_reached():
    eos, out = _eos_run(min_new_tokens=4)
    expected = [greedy_reference(p, N, eos=[eos], min_new=4) for p in PROMPTS]
    assert len(greedy_reference(PROMPTS[0], N, eos=[eos])) == 3 and len(expected[0]) > 4
    np.testing.assert_array_equal(out.tokens, padded(expected, N))
    np.testing.assert_array_equal(out.lengths, [len(e) for e in expected])


def test_log_probs_are_the_models_log_softmax_of_each_token():
    _, out = _eos_run()
    for row, prompt in enumerate(PROMPTS):
        n = int(out.lengths[row])
        gen = np.asarray(out.tokens[row, :n]).tolist()
        expected = [log_softmax_np(logits_np(prompt + gen[:t]))[gen[t]] for t in range(n)]
        np.testing.assert_allclose(out.log_probs[row, :n], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out.log_probs[row, n:], 0.0)


def test_stop_sequences_end_rows_only_on_generated_tokens():
    # Row 0's prompt ends with 1 and its first new token is 0: [1, 0] straddles the prompt
    # and must not stop it, while row 3 generates 1, 0 itself and stops.
    stops = [[1, 0], [7, 6, 3]]
    assert PROMPTS[0][-1] == 1 and greedy_reference(PROMPTS[0], 1) == [0]
    out = sample.generate(TOY, PROMPTS, max_new_tokens=N, stop_sequences=stops)
    expected = [greedy_reference(p, N, stops=stops) for p in PROMPTS]
    assert [len(e) for e in expected] == [8, 4, 8, 2]
    np.testing.assert_array_equal(out.tokens, padded(expected, N))
    np.testing.assert_array_equal(out.lengths, [8, 4, 8, 2])
    np.testing.assert_array_equal(out.finished, [False, True, False, True])
    assert out.to_lists() == expected


def test_prompt_bucket_shrinks_to_fit_the_cache():
    # 10 prompt tokens + 10 new would need bucket 16 + 10 > 24: the bucket becomes 14.
    prompt = [list(range(10))]
    out = sample.generate(TOY, prompt, max_new_tokens=10, max_length=24)
    np.testing.assert_array_equal(out.tokens[0], greedy_reference(prompt[0], 10))


def test_new_prompt_lengths_within_a_bucket_do_not_recompile():
    traces = []

    def counting(tokens, positions, segment_ids, cache):
        traces.append(tokens.shape)  # runs only while tracing
        return TOY.tokens_to_logits(tokens, positions, segment_ids, cache)

    decoder = FunctionDecoder(
        counting, TOY.init_cache, info=DecoderInfo(vocab_size=V), take_rows_fn=TOY.take_rows
    )
    first = sample.generate(decoder, [[4, 1, 2]], max_new_tokens=4)
    per_compile = len(traces)
    assert per_compile > 0 and traces[0] == (1, 16)
    for prompt in ([5] * 9, list(range(12)) + [3] * 4):  # 9 and 16 tokens: still bucket 16
        out = sample.generate(decoder, [prompt], max_new_tokens=4)
        np.testing.assert_array_equal(out.tokens[0], greedy_reference(prompt, 4))
    assert len(traces) == per_compile
    sample.generate(decoder, [[1] * 17], max_new_tokens=4)  # bucket 32: one new compile
    assert len(traces) == 2 * per_compile and traces[per_compile] == (1, 32)
    np.testing.assert_array_equal(first.tokens[0], greedy_reference([4, 1, 2], 4))


# Sampling -------------------------------------------------------------------------------------


def filtered_probs(logits, temperature, top_k, top_p):
    """float64 NumPy twin of the HF filter order: temperature, top-k, top-p (renormalised)."""
    p = np.exp(log_softmax_np(np.asarray(logits, np.float64) / temperature))
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    keep[order[: top_k or len(p)]] = True
    p = np.where(keep, p, 0.0) / np.sum(p[keep])
    if top_p < 1.0:
        sorted_p = p[order]
        before = np.cumsum(sorted_p) - sorted_p
        # The test distribution keeps clear of the boundary, so float32 cannot flip a token.
        assert np.min(np.abs(before - top_p)) > 1e-3
        kept = order[before < top_p]
        p = np.where(np.isin(np.arange(len(p)), kept), p, 0.0)
        p = p / p.sum()
    return p


def chi_square_critical(df: int, z: float = 3.0902) -> float:
    """Upper 0.1% point of chi-square(df) by the Wilson–Hilferty approximation."""
    return df * (1.0 - 2.0 / (9.0 * df) + z * math.sqrt(2.0 / (9.0 * df))) ** 3


SAMPLE_LOGITS = np.array([2.0, 1.5, 1.1, 0.6, 0.2, -0.3, -0.9, -1.6], np.float32)


@pytest.mark.parametrize(
    "strategy",
    [
        Sample(temperature=0.7),
        Sample(temperature=1.5, top_k=5),
        Sample(temperature=1.0, top_p=0.6),
        # top-p over the renormalised top-4 keeps 3 tokens; over the full softmax, 4.
        Sample(temperature=1.3, top_k=4, top_p=0.75),
    ],
)
def test_sampling_frequencies_match_filtered_softmax(strategy):
    constant = MarkovToy(jnp.broadcast_to(jnp.asarray(SAMPLE_LOGITS), (8, 8)))
    out = sample.generate(
        constant, [[0]] * 64, max_new_tokens=64, strategy=strategy, rng=jax.random.key(7)
    )
    counts = np.bincount(np.asarray(out.tokens).ravel(), minlength=8)
    draws = counts.sum()
    expected = draws * filtered_probs(
        SAMPLE_LOGITS, strategy.temperature, strategy.top_k, strategy.top_p
    )
    assert np.all(counts[expected == 0] == 0), "a filtered-out token was sampled"
    support = expected > 0
    stat = np.sum((counts[support] - expected[support]) ** 2 / expected[support])
    assert stat < chi_square_critical(int(support.sum()) - 1), (counts, expected)


def test_sampling_is_reproducible_and_seed_dependent():
    strategy = Sample(temperature=0.7)
    constant = MarkovToy(jnp.broadcast_to(jnp.asarray(SAMPLE_LOGITS), (8, 8)))
    run = [
        sample.generate(constant, [[0]] * 64, max_new_tokens=64, strategy=strategy, rng=seed)
        for seed in (7, 7, 8)
    ]
    np.testing.assert_array_equal(run[0].tokens, run[1].tokens)
    assert np.any(np.asarray(run[0].tokens) != np.asarray(run[2].tokens))


def test_top_k_one_and_temperature_zero_equal_greedy():
    greedy = sample.generate(TOY, PROMPTS, max_new_tokens=N)
    cold = sample.generate(TOY, PROMPTS, max_new_tokens=N, strategy=Sample(temperature=0.0))
    top1 = sample.generate(
        TOY, PROMPTS, max_new_tokens=N, strategy=Sample(temperature=0.7, top_k=1), rng=3
    )
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    assert isinstance(Greedy(), Greedy)


# Streaming and encoder–decoder ----------------------------------------------------------------


def test_stream_yields_the_same_tokens_as_generate():
    eos = greedy_reference(PROMPTS[0], N)[2]
    kwargs = {"max_new_tokens": N, "eos_id": eos, "strategy": Sample(top_k=4), "rng": 5}
    whole = sample.generate(TOY, PROMPTS, **kwargs)
    steps = list(sample.stream(TOY, PROMPTS, **kwargs))
    assert len(steps) == int(np.max(whole.lengths))
    np.testing.assert_array_equal(np.stack(steps, axis=1), whole.tokens[:, : len(steps)])


def test_encoder_decoder_prompts_feed_the_encoder():
    table = random_table(3, 9, 9)
    toy = EncDecToy(jnp.asarray(table))
    inputs = [[4, 5, 6], [8], [1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3, 4, 5, 6, 7, 8]]
    out = sample.generate(toy, inputs, max_new_tokens=5)
    for row, enc in enumerate(inputs):
        token, expected = toy.decoder_start_id, []
        for _ in range(5):
            token = int(np.argmax(table[(token + sum(enc)) % 9]))
            expected.append(token)
        np.testing.assert_array_equal(out.tokens[row], expected)
