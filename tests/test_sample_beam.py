"""Beam search: a Markov chain whose best beam is known, and a float64 NumPy reference.

The reference below is Hugging Face's beam search (transformers `_beam_search`: 2K
candidates, EOS candidates ranked < K finish, HF length penalty and early-stopping rules)
written for one prompt with Python lists of hypotheses, so it shares no code or vectorised
indexing with the engine.
"""

from __future__ import annotations

import dataclasses
import functools

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
from llm_jax.sample import Beam

V = 12
EOS = 1
PROMPTS = [[3, 7, 2], [5], [2, 9, 4, 4, 8, 10, 11, 0, 7]]
N = 10


def beam_reference(logits_fn, prompt, beam: Beam, n, eos=(), min_new=0, stops=()):
    """HF beam search for one prompt in float64; returns [(score, tokens, log_probs, ended)]."""
    k, lp = beam.num_beams, beam.length_penalty
    num_cand = max(2, 1 + len(eos)) * k
    live = [([], 0.0 if j == 0 else -1e9, []) for j in range(k)]  # (tokens, sum, per-token)
    finished = []
    improvable = True
    for t in range(n):
        cands = []
        for j, (tokens, score, token_lps) in enumerate(live):
            log_p = log_softmax_np(logits_fn(prompt + tokens))
            if t < min_new:
                log_p[list(eos)] = -np.inf
            for v, token_lp in enumerate(log_p):
                flat_index = j * len(log_p) + v  # top_k's order among equal scores
                cands.append((score + token_lp, flat_index, [*tokens, v], [*token_lps, token_lp]))
        cands.sort(key=lambda c: (-c[0], c[1]))
        next_live, stopped = [], []
        full = beam.early_stopping is True and len(finished) == k
        for rank, (score, _, tokens, token_lps) in enumerate(cands[:num_cand]):
            ended = tokens[-1] in eos or any(tokens[-len(s) :] == list(s) for s in stops)
            if not (ended or t + 1 == n):
                next_live.append((tokens, score, token_lps))
                continue
            stopped.append((tokens, score - 1e9, token_lps))
            if rank < k and improvable and not full:
                finished.append((score / (t + 1) ** lp, tokens, token_lps, ended))
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        live = (next_live + stopped)[:k]
        best_length = n if beam.early_stopping == "never" and lp > 0 else t + 1
        if len(finished) == k and live[0][1] / best_length**lp <= finished[-1][0]:
            improvable = False
        if not improvable or (beam.early_stopping is True and len(finished) == k):
            break
    return finished[: beam.num_return_sequences]


def history_toy(seed: int) -> tuple[HistoryToy, np.ndarray]:
    table = random_table(seed, HISTORY_MODULUS, V, eos_boost=1.0)
    return HistoryToy(jnp.asarray(table)), table


def assert_matches_reference(out, expected_rows, n):
    for row, expected in enumerate(expected_rows):
        assert len(expected) == out.tokens.shape[1]
        for r, (score, tokens, token_lps, ended) in enumerate(expected):
            got = np.asarray(out.tokens[row, r]).tolist()
            assert got == tokens + [0] * (n - len(tokens)), (row, r, got, tokens)
            assert int(out.lengths[row, r]) == len(tokens)
            assert bool(out.finished[row, r]) == ended
            np.testing.assert_allclose(float(out.scores[row, r]), score, rtol=1e-5, atol=1e-5)
            if out.log_probs is not None:
                np.testing.assert_allclose(
                    out.log_probs[row, r, : len(tokens)], token_lps, rtol=1e-5, atol=1e-5
                )


@pytest.mark.parametrize(
    "beam, min_new, stops, seeds, other_stopping",
    [
        (Beam(4, 1.0, False, num_return_sequences=4), 0, (), (4, 5, 9, 34), "never"),
        (Beam(3, 2.0, "never", num_return_sequences=2), 3, (), (5, 17, 22, 0), False),
        (Beam(4, 0.0, True, num_return_sequences=2), 0, (), (3, 32, 0, 1), False),
        (Beam(2, -0.5, False, num_return_sequences=2), 1, ((4, 4), (7,)), (5, 8, 0, 2), True),
    ],
)
def test_beam_search_matches_float64_reference(beam, min_new, stops, seeds, other_stopping):
    """The seeds are picked so that the early-stopping rule decides some outcomes: with
    `other_stopping` the reference answers differently (checked), so the engine must
    reproduce HF's stopping rule, not merely find good beams."""
    rule_mattered = False
    for seed in seeds:  # same shapes: one compile, four random models
        toy, table = history_toy(seed)
        out = sample.generate(
            toy,
            PROMPTS,
            max_new_tokens=N,
            strategy=beam,
            eos_id=EOS,
            min_new_tokens=min_new,
            stop_sequences=stops,
            return_log_probs=True,
        )
        kwargs = {"eos": (EOS,), "min_new": min_new, "stops": stops}
        expected = []
        for prompt in PROMPTS:
            logits_fn = functools.partial(history_logits_np, table)
            expected.append(beam_reference(logits_fn, prompt, beam, N, **kwargs))
            other = dataclasses.replace(beam, early_stopping=other_stopping)
            alternative = beam_reference(logits_fn, prompt, other, N, **kwargs)
            rule_mattered |= [h[1] for h in alternative] != [h[1] for h in expected[-1]]
        assert_matches_reference(out, expected, N)
    assert rule_mattered


def test_reference_sees_both_eos_and_max_length_endings():
    """The random models above exercise both ways a hypothesis ends (guards the test)."""
    beam = Beam(4, num_return_sequences=4)
    ended = []
    for seed in (4, 5, 9, 34):
        logits_fn = functools.partial(history_logits_np, history_toy(seed)[1])
        for prompt in PROMPTS:
            ended += [h[3] for h in beam_reference(logits_fn, prompt, beam, N, (EOS,))]
    assert any(ended) and not all(ended)


def test_scores_are_hf_length_normalised_sums_of_log_probs():
    toy, _ = history_toy(0)
    beam = Beam(4, length_penalty=1.0, num_return_sequences=4)
    out = sample.generate(
        toy, PROMPTS, max_new_tokens=N, strategy=beam, eos_id=EOS, return_log_probs=True
    )
    sums = np.sum(np.asarray(out.log_probs), axis=-1)
    np.testing.assert_allclose(out.scores, sums / np.asarray(out.lengths), rtol=1e-5)
    assert np.all(np.diff(np.asarray(out.scores), axis=-1) <= 0)  # best first


def test_beam_batch_rows_equal_each_prompt_alone():
    toy, _ = history_toy(1)
    beam = Beam(4, num_return_sequences=4)
    batch = sample.generate(toy, PROMPTS, max_new_tokens=N, strategy=beam, eos_id=EOS)
    for row, prompt in enumerate(PROMPTS):
        alone = sample.generate(toy, [prompt], max_new_tokens=N, strategy=beam, eos_id=EOS)
        np.testing.assert_array_equal(batch.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(batch.scores[row], alone.scores[0], rtol=1e-6)


# A garden path (after the t5x decoding_test Markov chain): greedy takes the likelier first
# step A, whose continuations are spread thin; the best sequence starts with B.
START, A, B, X1, X2, X3, X4 = 2, 3, 4, 5, 6, 7, 8
GARDEN = np.full((9, 9), 1e-6)
GARDEN[START, [A, B]] = [0.55, 0.45]
GARDEN[A, [X1, X2, X3, X4]] = [0.3, 0.25, 0.25, 0.2]
GARDEN[B, [X1, X2]] = [0.9, 0.1]
GARDEN[[X1, X2, X3, X4], EOS] = 1.0
GARDEN[[0, EOS], 0] = 1.0
GARDEN_LOGITS = np.log(GARDEN / GARDEN.sum(-1, keepdims=True)).astype(np.float32)


def test_markov_chain_best_beam_is_known():
    chain = MarkovToy(jnp.asarray(GARDEN_LOGITS))
    greedy = sample.generate(chain, [[START]], max_new_tokens=4, eos_id=EOS)
    assert greedy.to_lists() == [[A, X1, EOS]]  # p = 0.55 * 0.3 = 0.165
    out = sample.generate(
        chain, [[START]], max_new_tokens=4, eos_id=EOS, strategy=Beam(2, num_return_sequences=2)
    )
    assert out.to_lists() == [[[B, X1, EOS], [A, X1, EOS]]]  # p = 0.405, then 0.165
    np.testing.assert_allclose(out.scores[0], np.log([0.45 * 0.9, 0.55 * 0.3]) / 3, rtol=1e-4)


def test_one_beam_without_eos_is_greedy():
    toy, _ = history_toy(2)
    greedy = sample.generate(toy, PROMPTS, max_new_tokens=N)
    one = sample.generate(toy, PROMPTS, max_new_tokens=N, strategy=Beam(1))
    np.testing.assert_array_equal(one.tokens[:, 0], greedy.tokens)


def test_encoder_decoder_beam_search_matches_reference():
    table = random_table(5, V, V, eos_boost=1.0)
    toy = EncDecToy(jnp.asarray(table))
    inputs = [[4, 5, 6], [8], [1, 2, 3, 4, 5, 6, 7, 8, 0, 1]]
    beam = Beam(3, num_return_sequences=3)
    out = sample.generate(
        toy, inputs, max_new_tokens=6, strategy=beam, eos_id=EOS, return_log_probs=True
    )
    expected = []
    for enc in inputs:

        def logits_fn(seq, enc=enc):
            return table[(seq[-1] + sum(enc)) % V]

        hyps = beam_reference(logits_fn, [toy.decoder_start_id], beam, 6, eos=(EOS,))
        expected.append(hyps)
    assert_matches_reference(out, expected, 6)
