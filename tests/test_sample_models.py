"""`generate` on the real (tiny, randomly initialised) GPT and T5 through their adapters.

The references use the models' uncached full forwards only: greedy is an argmax loop over
`model(tokens)`, beam search is the float64 HF reference of test_sample_beam.py fed with
those logits. Cached, left-padded, beam-reordered decoding must reproduce them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sample_beam import assert_matches_reference, beam_reference

import llm_jax as lj
import llm_jax.sample as sample
from llm_jax.models._xla_cpu import restack
from llm_jax.sample import Beam
from llm_jax.sample.adapters import GPTDecoder, T5Decoder, as_decoder

PROMPTS = [[5, 17, 300, 2], [44], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12, 13, 14, 15, 16, 99]]
WIDTH = 48  # fixed length of the uncached reference forwards (one compile each)


@functools.cache
def gpt(preset: str) -> lj.models.GPT:
    return lj.models.GPT(lj.ModelConfig.preset(preset), rngs=nnx.Rngs(0))


@functools.cache
def t5() -> lj.models.T5:
    return lj.models.T5(lj.ModelConfig.preset("t5-tiny"), rngs=nnx.Rngs(1))


def gpt_logits_fn(model):
    """seq -> next-token logits [V] by a full causal forward (right padding is harmless)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, tokens: nnx.merge(graphdef, s)(tokens))

    def logits_fn(seq):
        tokens = jnp.asarray([list(seq) + [0] * (WIDTH - len(seq))], jnp.int32)
        return np.asarray(forward(state, tokens)[0, len(seq) - 1], np.float64)

    return logits_fn


def t5_logits_fn(model, encoder_input):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, enc, dec: nnx.merge(graphdef, s)(enc, dec))
    enc = jnp.asarray([encoder_input], jnp.int32)

    def logits_fn(seq):
        dec = jnp.asarray([list(seq) + [0] * (16 - len(seq))], jnp.int32)
        return np.asarray(forward(state, enc, dec)[0, len(seq) - 1], np.float64)

    return logits_fn


def greedy_loop(logits_fn, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(logits_fn(seq))))
    return seq[len(prompt) :]


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_gpt_greedy_equals_argmax_loop_over_uncached_forwards(preset):
    model = gpt(preset)
    out = sample.generate(model, PROMPTS, max_new_tokens=8)
    logits_fn = gpt_logits_fn(model)
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(out.tokens[row], greedy_loop(logits_fn, prompt, 8))


def test_gpt_beam_search_matches_reference_on_uncached_forwards():
    model = gpt("gpt2-tiny")
    beam = Beam(3, length_penalty=1.0, num_return_sequences=3)
    logits_fn = gpt_logits_fn(model)
    eos = greedy_loop(logits_fn, PROMPTS[0], 3)[-1]  # some hypotheses end early
    out = sample.generate(
        model, PROMPTS, max_new_tokens=6, strategy=beam, eos_id=eos, return_log_probs=True
    )
    expected = [beam_reference(logits_fn, p, beam, 6, eos=(eos,)) for p in PROMPTS]
    assert_matches_reference(out, expected, 6)


def test_t5_greedy_and_beam_match_uncached_forwards():
    model = t5()
    inputs = [[5, 6, 7, 8, 9], [100], [3] * 20]
    greedy = sample.generate(model, inputs, max_new_tokens=6)
    beam = Beam(2, num_return_sequences=2)
    beams = sample.generate(model, inputs, max_new_tokens=6, strategy=beam)
    for row, enc in enumerate(inputs):
        logits_fn = t5_logits_fn(model, enc)
        np.testing.assert_array_equal(greedy.tokens[row], greedy_loop(logits_fn, [0], 6))
        expected = beam_reference(logits_fn, [0], beam, 6)
        assert_matches_reference(
            jax.tree.map(lambda x, row=row: x[row : row + 1], beams), [expected], 6
        )


def test_adapters_wrap_models_and_refuse_others():
    assert isinstance(as_decoder(gpt("gpt2-tiny")), GPTDecoder)
    decoder = as_decoder(t5())
    assert isinstance(decoder, T5Decoder) and decoder.info.is_encoder_decoder
    assert as_decoder(gpt("gpt2-tiny")).info.max_length == 128
    with pytest.raises(ValueError, match="max_length is 128"):
        sample.generate(gpt("gpt2-tiny"), [[1] * 100], max_new_tokens=40)
    bert = lj.models.BERT(lj.ModelConfig.preset("bert-tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="GPT or T5"):
        sample.generate(bert, [[1, 2]], max_new_tokens=4)


@pytest.mark.parametrize(
    "strategy", [sample.Greedy(), Beam(num_beams=3, num_return_sequences=2)], ids=str
)
@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "t5-tiny"])
def test_cpu_tricks_decode_like_the_plain_scanned_path(name, strategy):
    """The XLA:CPU loop form (unrolled, per-layer weights, head-major cache) and the
    GPU/TPU path (scan over the stacked weights, length-major cache) give the same tokens."""
    model = t5() if name == "t5-tiny" else gpt(name)
    kwargs = dict(max_new_tokens=8, strategy=strategy, return_log_probs=True)
    outs = [
        sample.generate(as_decoder(model, cpu_tricks=tricks), PROMPTS, **kwargs)
        for tricks in (False, True)
    ]
    plain, tricks = outs
    np.testing.assert_array_equal(np.asarray(tricks.tokens), np.asarray(plain.tokens))
    np.testing.assert_allclose(
        np.asarray(tricks.log_probs), np.asarray(plain.log_probs), rtol=0, atol=1e-5
    )


def test_gpu_path_holds_one_stacked_copy_and_scans():
    """Without the CPU tricks the decoder keeps the model's stacked [L, ...] weights (no
    per-layer copy) and a scanned program; with them, per-layer slices and unrolled layers."""
    model = gpt("gpt2-tiny")
    plain, tricks = (as_decoder(model, cpu_tricks=c) for c in (False, True))
    kernel = plain.params["layers"]["blocks"]["mlp"]["wi"]["kernel"]
    assert kernel.shape[0] == model.cfg.num_layers
    assert isinstance(tricks.params["layers"]["blocks"]["mlp"]["wi"]["kernel"], tuple)
    assert nnx.merge(plain.graphdef, plain.params).layers.scan
    assert not nnx.merge(tricks.graphdef, restack(tricks.params)).layers.scan
