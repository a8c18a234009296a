"""Speculative decoding and batch buckets on tiny random GPTs.

The draft is the target with noise on every parameter, so it agrees with the target often
but not always, and rows accept different numbers of tokens. Greedy speculation must be
the target's own greedy decoding token for token (EOS, stop sequences, min_new_tokens and
log-probs included); speculative sampling must have the target's distribution (a
chi-square test of the joint law of the first three tokens against the exact one from
uncached forwards, which also rejects the draft's own law).
"""

from __future__ import annotations

import functools
import importlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import llm_jax as lj
import llm_jax.sample as sample
from llm_jax.sample import Beam, FunctionDecoder, Greedy, Sample, Speculative

generate_module = importlib.import_module("llm_jax.sample.generate")
PROMPTS = [[5, 17, 30, 2], [44], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11]]  # bucket 4: one dummy
N = 24


def config(vocab: int):
    # A wide initialisation makes the random model's next token depend on its context.
    return lj.ModelConfig.preset("gpt2-tiny").replace(vocab_size=vocab, initializer_range=0.3)


def noisy_copy(model: lj.models.GPT, scale: float) -> lj.models.GPT:
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [
        x + scale * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, noisy))


@functools.cache
def models(vocab: int = 64, noise: float = 0.08):
    """(target model, target decoder, draft decoder)."""
    target = lj.models.GPT(config(vocab), rngs=nnx.Rngs(0))
    draft = noisy_copy(target, noise)
    return target, sample.as_decoder(target), sample.as_decoder(draft)


def assert_same_output(got, want, log_probs=False):
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
    np.testing.assert_array_equal(np.asarray(got.finished), np.asarray(want.finished))
    if log_probs:
        np.testing.assert_allclose(got.log_probs, want.log_probs, rtol=1e-4, atol=1e-5)


def test_greedy_is_the_targets_greedy_token_for_token():
    _, target, draft = models()
    want = sample.generate(target, PROMPTS, max_new_tokens=N)
    got = sample.generate(target, PROMPTS, max_new_tokens=N, strategy=Speculative(draft, k=3))
    assert_same_output(got, want)
    accepted = np.asarray(got.draft_accepted)
    assert got.tokens.shape == (3, N) and accepted.shape == (3,)
    assert 0.0 < got.acceptance_rate < 1.0
    assert len(set(accepted.tolist())) > 1  # rows accepted different numbers of tokens


@pytest.mark.parametrize("sampling,eos", [(Greedy(), 7), (Sample(temperature=1.0, top_k=20), None)])
def test_streamed_speculation_equals_generate_column_by_column(sampling, eos):
    _, target, draft = models()
    strategy = Speculative(draft, k=3, sampling=sampling)
    kw = dict(max_new_tokens=N, strategy=strategy, rng=3, eos_id=eos)
    want = sample.generate(target, PROMPTS, **kw)
    stream = sample.stream(target, PROMPTS, **kw)
    assert isinstance(stream, sample.SpeculativeStream)
    columns = list(stream)
    got = np.stack(columns, axis=1)
    width = int(np.max(want.lengths))
    assert got.shape == (3, width)
    np.testing.assert_array_equal(got, np.asarray(want.tokens)[:, :width])
    assert stream.acceptance_rate == want.acceptance_rate


@pytest.mark.parametrize("draft_is_target", [True, False])
def test_greedy_with_eos_stops_and_log_probs_inside_accepted_blocks(draft_is_target):
    """With the target as its own draft every block is accepted whole, so the EOS (and the
    stop sequence) fall inside accepted blocks; the noisy draft mixes in rejections."""
    _, target, draft = models()
    knobs = dict(
        max_new_tokens=N,
        eos_id=59,
        min_new_tokens=3,
        stop_sequences=[[27, 6]],
        return_log_probs=True,
        pad_id=0,
    )
    want = sample.generate(target, PROMPTS, **knobs)
    spec = Speculative(target if draft_is_target else draft, k=4)
    got = sample.generate(target, PROMPTS, strategy=spec, **knobs)
    assert_same_output(got, want, log_probs=True)
    finished = np.asarray(got.finished)
    assert finished.any() and (np.asarray(got.lengths)[finished] < N).all()
    if draft_is_target:
        assert got.acceptance_rate == 1.0


def exact_joint(model, prompt, logits_to_probs, vocab):
    """p(t0, t1, t2 | prompt) [V, V, V] in float64 from uncached forwards."""
    pairs = np.array(list(itertools.product(range(vocab), repeat=2)), np.int32)  # [V^2, 2]
    tokens = np.concatenate([np.tile(prompt, (len(pairs), 1)), pairs], axis=1)
    logits = np.asarray(model(jnp.asarray(tokens)), np.float64)  # [V^2, P + 2, V]
    p = len(prompt)
    joint = np.zeros((vocab,) * 3)
    for (t0, t1), row in zip(pairs, logits, strict=True):
        first, second = logits_to_probs(row[p - 1])[t0], logits_to_probs(row[p])[t1]
        joint[t0, t1] = first * second * logits_to_probs(row[p + 1])
    return joint


def top_k_probs(logits, temperature=0.9, top_k=6):
    scaled = logits / temperature
    keep = scaled >= np.sort(scaled)[-top_k]
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    return probs / probs.sum()


def chi_square_p(counts, expected_probs):
    """p-value of Pearson's test, merging the bins expected below 5 into one."""
    expected = expected_probs.ravel() * counts.sum()
    counts = counts.ravel()
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(obs, exp).pvalue


def test_sampling_keeps_the_targets_distribution():
    vocab, rows, prompt = 8, 8192, [1, 2]
    model, target, draft = models(vocab, noise=0.3)
    strategy = Sample(temperature=0.9, top_k=6)
    out = sample.generate(
        target,
        np.tile(prompt, (rows, 1)),
        max_new_tokens=3,
        strategy=Speculative(draft, k=2, sampling=strategy),
        rng=jax.random.key(0),
    )
    tokens = np.asarray(out.tokens)
    assert 0.0 < out.acceptance_rate < 1.0
    counts = np.zeros((vocab,) * 3)
    np.add.at(counts, tuple(tokens.T), 1)
    assert chi_square_p(counts, exact_joint(model, prompt, top_k_probs, vocab)) > 1e-3
    # The test has power: the same samples reject the draft's own law.
    draft_model = noisy_copy(model, 0.3)
    assert chi_square_p(counts, exact_joint(draft_model, prompt, top_k_probs, vocab)) < 1e-6


def test_bad_speculation_is_refused_before_compiling():
    _, target, draft = models()
    other_vocab = models(vocab=8)[1]
    with pytest.raises(ValueError, match="draft's vocabulary has 8 tokens but the model's has 64"):
        sample.generate(target, PROMPTS, max_new_tokens=4, strategy=Speculative(other_vocab))
    with pytest.raises(ValueError, match="beam search does not speculate"):
        Speculative(draft, sampling=sample.Beam())
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        Speculative(draft, k=0)
    with pytest.raises(ValueError, match="use generate"):
        sample.stream(target, PROMPTS, max_new_tokens=4, strategy=Beam())
    with pytest.raises(ValueError, match=r"needs \d+ cache slots"):
        # Learned positions (128) cannot hold the holes of 4 rows x 64 tokens.
        sample.generate(target, PROMPTS, max_new_tokens=64, strategy=Speculative(draft))
    bare = FunctionDecoder(
        lambda tokens, positions, segments, cache: (jnp.zeros((*tokens.shape, 64)), cache),
        lambda b, s: jnp.zeros((b, s)),
        sample.DecoderInfo(vocab_size=64),
    )
    with pytest.raises(ValueError, match="the draft has no rewind"):
        sample.generate(target, PROMPTS, max_new_tokens=4, strategy=Speculative(bare))
    assert sample.Speculative(draft, sampling=Sample(temperature=0.0)).sampling == Greedy()


def test_batch_sizes_within_a_bucket_share_one_compile():
    _, target, _ = models()
    jitted = generate_module._generate_jit
    four = [*PROMPTS, [3, 3]]
    want = sample.generate(target, four, max_new_tokens=6)
    size = jitted._cache_size()
    three = sample.generate(target, PROMPTS, max_new_tokens=6)
    assert jitted._cache_size() == size  # 3 rows pad to the bucket of 4
    np.testing.assert_array_equal(np.asarray(three.tokens), np.asarray(want.tokens)[:3])
    assert three.tokens.shape == (3, 6)
    five = sample.generate(target, [*four, [7]], max_new_tokens=6)
    assert jitted._cache_size() == size + 1 and five.tokens.shape == (5, 6)
    assert [sample.batch_bucket(b) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]


def test_dummy_rows_start_finished_and_are_dropped():
    """Sampling: the padded rows start finished, so they never keep the loop going."""
    _, target, _ = models()
    decoder, prompt, controls, rng, spec = generate_module._check_and_pad(
        target, PROMPTS, generate_module.Request(max_new_tokens=4, strategy=Sample()), rng=0
    )
    state = generate_module._stream_prefill(decoder, prompt, controls, rng, spec)
    np.testing.assert_array_equal(np.asarray(state.done), [False, False, False, True])
    np.testing.assert_array_equal(np.asarray(state.lengths), [1, 1, 1, 0])
    streamed = list(sample.stream(target, PROMPTS, max_new_tokens=4))
    assert len(streamed) == 4 and all(t.shape == (3,) for t in streamed)
