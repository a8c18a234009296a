"""Structured pruning: a zero head or neuron pruned changes nothing, the pruned model's size
is the formula's, the checkpoint the CLI writes loads and runs, bad requests fail clearly."""

import jax
import numpy as np
import pytest
from flax import nnx

from llm_jax.cli import main
from llm_jax.compress.structured import (
    gradient_saliency,
    head_scores,
    neuron_scores,
    norm_saliency,
    param_count,
    prune_structure,
)
from llm_jax.convert import restore_model, save_checkpoint
from llm_jax.convert.hf import model_from_params, params_of
from llm_jax.models import ModelConfig, build
from llm_jax.models.common import count_params

GPT = ModelConfig.preset("gpt2-tiny", d_model=32, num_heads=4, d_ff=48, num_layers=2, vocab_size=61)
TOKENS = np.random.default_rng(0).integers(0, 61, (2, 12)).astype(np.int32)


@nnx.jit
def _logits(model):
    return model(TOKENS)


def _with_dead_units(cfg, head, neurons):
    """A model whose `head` (all layers) and `neurons` have all-zero weights."""
    params = jax.tree.map(np.array, params_of(build(cfg, rngs=nnx.Rngs(3))))
    attn, mlp = params["layers"]["blocks"]["self_attn"], params["layers"]["blocks"]["mlp"]
    for name in ("q", "k", "v"):
        attn[name]["kernel"][:, :, head] = 0
        attn[name]["bias"][:, head] = 0
    attn["o"]["kernel"][:, head] = 0
    mlp["wi"]["kernel"][:, :, neurons] = 0
    mlp["wi"]["bias"][:, neurons] = 0
    mlp["wo"]["kernel"][:, neurons] = 0
    return params


def test_pruning_zero_heads_and_neurons_changes_nothing():
    neurons = [0, 5, 17, 40]
    params = _with_dead_units(GPT, 2, neurons)
    before = _logits(model_from_params(GPT, params))
    scores = head_scores(norm_saliency(params))
    assert scores.shape == (2, 4) and np.all(scores[:, 2] == 0) and np.all(scores[:, [0, 1, 3]] > 0)
    assert np.all(neuron_scores(norm_saliency(params))[:, neurons] == 0)
    cfg, pruned = prune_structure(GPT, params, heads=3, ffn=48 - len(neurons))
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff) == (3, 3, 8, 44)
    after = _logits(model_from_params(cfg, pruned))
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    # Gradient importance: a dead unit gets no gradient either.
    batch = {
        "tokens": TOKENS,
        "targets": np.roll(TOKENS, -1, 1),
        "weights": np.ones((2, 12), np.float32),
    }
    taylor = gradient_saliency(model_from_params(GPT, params), [batch, batch], "clm")
    assert np.all(head_scores(taylor)[:, 2] == 0) and np.all(head_scores(taylor)[:, 0] > 0)


@pytest.mark.parametrize(
    "cfg, heads, ffn",
    [(GPT, 2, 20), (ModelConfig.preset("llama-tiny", d_model=32, num_layers=2, d_ff=48), 4, 16)],
)
def test_pruned_parameter_count_is_the_formula(cfg, heads, ffn):
    params = params_of(build(cfg, rngs=nnx.Rngs(0)))
    new_cfg, pruned = prune_structure(cfg, params, heads=heads, ffn=ffn)
    assert count_params(pruned) == param_count(cfg, heads, ffn)
    assert count_params(build(new_cfg, rngs=nnx.Rngs(0))) == count_params(pruned)
    d, h, layers = cfg.d_model, cfg.head_dim, cfg.num_layers
    if cfg.use_bias:  # GPT-2: q k v o kernels + q k v biases; wi + bias, wo
        removed = (cfg.num_heads - heads) * (4 * d * h + 3 * h) + (cfg.d_ff - ffn) * (2 * d + 1)
    else:  # LLaMA: wi, wi_gate, wo
        removed = (cfg.num_heads - heads) * 4 * d * h + (cfg.d_ff - ffn) * 3 * d
    assert count_params(pruned) == count_params(params) - layers * removed


def test_bad_requests_name_the_fix():
    llama = ModelConfig.preset("llama-tiny", d_model=32, num_layers=2, d_ff=48)
    params = params_of(build(llama, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="Keep --heads 4"):
        prune_structure(llama, params, heads=2, ffn=48)
    with pytest.raises(ValueError, match="between 1 and 48"):
        prune_structure(llama, params, heads=4, ffn=49)


def test_cli_writes_a_smaller_checkpoint_that_loads(tmp_path):
    params = _with_dead_units(GPT, 1, [3])
    save_checkpoint(model_from_params(GPT, params), tmp_path / "run")
    out = tmp_path / "small"
    argv = ["prune", "--checkpoint", str(tmp_path / "run"), "--heads", "3", "--ffn", "47"]
    assert main([*argv, "--out", str(out)]) == 0
    small = restore_model(out).model
    assert small.cfg.num_heads == 3 and count_params(small) == param_count(GPT, 3, 47)
    before = _logits(model_from_params(GPT, params))
    np.testing.assert_allclose(_logits(small), before, rtol=1e-5, atol=1e-5)
    sparse = tmp_path / "sparse"
    argv = ["prune", "--checkpoint", str(tmp_path / "run"), "--sparsity", "0.5"]
    assert main([*argv, "--out", str(sparse)]) == 0
    kernel = params_of(restore_model(sparse).model)["layers"]["blocks"]["mlp"]["wi"]["kernel"]
    assert 0.3 < np.mean(np.asarray(kernel) == 0) < 0.7
    assert main(["prune", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 2
