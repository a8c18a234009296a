"""Sharded decoding: parameters split over a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU
devices with the `fsdp_tp` rules decode to the same tokens as one device, with log-probs
and beam scores within 1e-5, and the KV cache is split over batch and KV heads. Also a
decoder built once (`as_decoder`, XLA:CPU loop form) and scanned layers against the model.
"""

from __future__ import annotations

import functools
import importlib

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import llm_jax as lj
import llm_jax.sample as sample
from llm_jax.parallel import MeshConfig, logical_axes, logical_to_sharding, make_mesh
from llm_jax.sample.adapters import GPTDecoder

generate_module = importlib.import_module("llm_jax.sample.generate")

PROMPTS = [[5, 17, 300, 2], [44], [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11], [3, 3]]
N = 10
RULES = "fsdp_tp"


@functools.cache
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules=RULES))


@functools.cache
def models(name: str):
    """(model on one device, the same parameters sharded on the mesh)."""
    cls = lj.models.T5 if name.startswith("t5") else lj.models.GPT
    model = cls(lj.ModelConfig.preset(name), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    shardings = logical_to_sharding(params, logical_axes(model), mesh(), RULES)
    sharded_state = nnx.split(model)[1]
    nnx.replace_by_pure_dict(sharded_state, jax.device_put(params, shardings))
    return model, nnx.merge(graphdef, sharded_state)


def both(name, **kwargs):
    single, sharded = models(name)
    one = sample.generate(single, PROMPTS, max_new_tokens=N, return_log_probs=True, **kwargs)
    many = sample.generate(
        sharded,
        PROMPTS,
        max_new_tokens=N,
        return_log_probs=True,
        mesh=mesh(),
        rules=RULES,
        **kwargs,
    )
    return one, many


def assert_same(one, many):
    assert len(many.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(many.tokens), np.asarray(one.tokens))
    np.testing.assert_array_equal(np.asarray(many.lengths), np.asarray(one.lengths))
    np.testing.assert_allclose(
        np.asarray(many.log_probs), np.asarray(one.log_probs), rtol=0, atol=1e-5
    )
    if one.scores is not None:
        np.testing.assert_allclose(
            np.asarray(many.scores), np.asarray(one.scores), rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "t5-tiny"])
def test_sharded_greedy_equals_one_device(name):
    assert_same(*both(name, eos_id=2))


@pytest.mark.parametrize("name", ["gpt2-tiny", "t5-tiny"])
def test_sharded_beam_equals_one_device(name):
    assert_same(*both(name, strategy=sample.Beam(num_beams=3, num_return_sequences=2)))


def test_sharded_sampling_and_stream_equal_one_device():
    strategy = sample.Sample(temperature=0.8, top_k=20, top_p=0.95)
    one, many = both("gpt2-tiny", strategy=strategy, rng=jax.random.key(1))
    assert_same(one, many)
    _, sharded = models("gpt2-tiny")
    kwargs = dict(max_new_tokens=N, strategy=strategy, rng=jax.random.key(1))
    streamed = list(sample.stream(sharded, PROMPTS, mesh=mesh(), rules=RULES, **kwargs))
    np.testing.assert_array_equal(np.stack(streamed, axis=1), np.asarray(one.tokens))


@pytest.mark.parametrize("cpu_tricks", [False, True])
def test_cache_is_split_over_batch_and_kv_heads(cpu_tricks):
    """The prefilled cache (the while-loop carry) follows its logical axes under fsdp_tp:
    [L, B, S, K, H] stacked, or per-layer head-major [B, K, S, H] slices on XLA:CPU."""
    _, sharded = models("gpt2-tiny")
    decoder, prompt, controls, rng, spec = generate_module._check_and_pad(
        GPTDecoder.from_model(sharded, cpu_tricks=cpu_tricks),
        PROMPTS,
        generate_module.Request(max_new_tokens=N),
        rng=None,
    )
    sharding = generate_module.MeshRules.make(mesh(), RULES)
    state = generate_module._stream_prefill(decoder, prompt, controls, rng, spec, sharding)
    kv = state.cache.self_kv
    if cpu_tricks:
        batch_heads = NamedSharding(mesh(), PartitionSpec(("data", "fsdp"), "tensor"))
        assert isinstance(kv.k, tuple) and len(kv.k) == 2
        for x in (*kv.k, *kv.v):
            assert x.sharding.is_equivalent_to(batch_heads, 4)
    else:
        spec = PartitionSpec(None, ("data", "fsdp"), None, "tensor")
        batch_heads = NamedSharding(mesh(), spec)
        assert kv.k.sharding.is_equivalent_to(batch_heads, 5)
        assert kv.v.sharding.is_equivalent_to(batch_heads, 5)
    batch = NamedSharding(mesh(), PartitionSpec(("data", "fsdp")))
    assert state.cache.valid.sharding.is_equivalent_to(batch, 2)


@pytest.mark.parametrize(
    "sharded, strategy", [(False, sample.Greedy()), (True, sample.Beam(num_beams=2))]
)
def test_prepared_decoder_equals_the_model(sharded, strategy):
    """A decoder built once (`as_decoder`: the loop form, cut once) decodes exactly like the
    model itself."""
    model = models("gpt2-tiny")[int(sharded)]
    where = dict(mesh=mesh(), rules=RULES) if sharded else {}
    prepared = sample.as_decoder(model, **where)
    kwargs = dict(max_new_tokens=N, strategy=strategy, return_log_probs=True, **where)
    a = sample.generate(model, PROMPTS, **kwargs)
    b = sample.generate(prepared, PROMPTS, **kwargs)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_array_equal(np.asarray(b.log_probs), np.asarray(a.log_probs))


def test_loop_form_of_scanned_layers_equals_unrolled():
    """A scan_layers / remat model decodes like an unrolled one (on CPU: the same loop form)."""
    cfg = lj.ModelConfig.preset("gpt2-tiny")
    plain = lj.models.GPT(cfg, rngs=nnx.Rngs(0))
    scanned = lj.models.GPT(cfg.replace(scan_layers=True, remat_policy="full"), rngs=nnx.Rngs(0))
    a = sample.generate(plain, PROMPTS, max_new_tokens=N, return_log_probs=True)
    b = sample.generate(scanned, PROMPTS, max_new_tokens=N, return_log_probs=True)
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))
    np.testing.assert_array_equal(np.asarray(b.log_probs), np.asarray(a.log_probs))


def test_mesh_and_rules_come_together():
    single, _ = models("gpt2-tiny")
    with pytest.raises(ValueError, match="needs rules="):
        sample.generate(single, PROMPTS, max_new_tokens=2, mesh=mesh())
    with pytest.raises(ValueError, match="needs mesh="):
        sample.generate(single, PROMPTS, max_new_tokens=2, rules=RULES)
