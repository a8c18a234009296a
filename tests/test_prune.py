"""Unstructured magnitude pruning: the schedule and the masks against NumPy twins, masks
that persist through optimizer updates and an exact checkpoint resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.checkpoint import CheckpointManager
from llm_jax.compress.prune import (
    PruneConfig,
    keep_largest,
    magnitude_masks,
    prunable_leaves,
    sparsity_of,
    sparsity_schedule,
)
from llm_jax.models import ModelConfig, build
from llm_jax.parallel import MeshConfig, activation_sharding, logical_axes, make_mesh
from llm_jax.train.compile import compile_steps, state_layout
from llm_jax.train.config import config_from_dict
from llm_jax.train.optimizer import OptimizerConfig
from tests.reference.compress_ref import (
    global_magnitude_masks_ref,
    magnitude_mask_ref,
    sparsity_schedule_ref,
)

GPT = ModelConfig.preset("gpt2-tiny", d_model=32, num_heads=2, d_ff=64, num_layers=2, vocab_size=97)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")


@pytest.mark.parametrize(
    "kw",
    [
        dict(start_step=3, end_step=23, frequency=4),
        dict(initial_sparsity=0.2, end_step=9, frequency=1),
    ],
)
def test_schedule_matches_the_numpy_twin(kw):
    cfg = PruneConfig(sparsity=0.8, **kw)
    schedule = sparsity_schedule(cfg, 100)
    ref_kw = {k: v for k, v in kw.items() if k != "initial_sparsity"}
    ref_kw = {("start" if k == "start_step" else "end" if k == "end_step" else k): v
              for k, v in ref_kw.items()}  # fmt: skip
    for step in range(0, 40):
        want = sparsity_schedule_ref(step, 0.8, initial=kw.get("initial_sparsity", 0.0), **ref_kw)
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, atol=1e-7)
    assert float(schedule(39)) == pytest.approx(0.8)


def test_masks_match_the_numpy_twin():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 5)).astype(np.float32)
    np.testing.assert_array_equal(keep_largest(jnp.abs(x), 0.37), magnitude_mask_ref(x, 0.37))
    params = {"a": x, "b": rng.normal(size=(11, 4)).astype(np.float32), "n": np.ones(4)}
    axes = {"a": ("layers", "embed", "mlp"), "b": ("embed", "mlp"), "n": ("embed",)}
    kinds = prunable_leaves(axes)
    assert kinds == {"a": "layers", "b": "whole", "n": None}
    glob = magnitude_masks(params, 0.6, kinds, "global")
    want = global_magnitude_masks_ref([params["a"], params["b"]], 0.6)
    np.testing.assert_array_equal(glob["a"], want[0])
    np.testing.assert_array_equal(glob["b"], want[1])
    assert bool(np.all(glob["n"]))
    per = magnitude_masks(params, 0.6, kinds, "layer")
    for layer in range(3):
        np.testing.assert_array_equal(per["a"][layer], magnitude_mask_ref(x[layer], 0.6))
    np.testing.assert_array_equal(per["b"], magnitude_mask_ref(params["b"], 0.6))


def _batch(seed=0, b=8, t=8):
    toks = np.random.default_rng(seed).integers(0, 97, (b, t + 1)).astype(np.int32)
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((b, t), np.float32)}


def test_masks_persist_through_updates_and_an_exact_resume(tmp_path):
    prune = PruneConfig(sparsity=0.5, start_step=0, end_step=2, frequency=1)
    layout = state_layout(GPT, OPT, make_mesh(MeshConfig()), total_steps=6, prune=prune)
    axes = logical_axes(nnx.eval_shape(lambda: build(GPT, rngs=nnx.Rngs(0))))
    batches = [_batch(i) for i in range(6)]
    with activation_sharding(layout.mesh, layout.rules):
        steps = compile_steps(layout, "clm", batches[0])
        state, seen = steps.init(), []
        for i, batch in enumerate(batches):
            state, _ = steps.train(state, layout.put_batch(batch))
            seen.append(sparsity_of(jax.device_get(state.params), axes))
            if i == 2:
                with CheckpointManager(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
                    ckpt.save(3, state, data_state={}, config={"x": 1})
        with CheckpointManager(tmp_path) as ckpt:
            resumed = ckpt.restore(layout.abstract_state).state
        for batch in batches[3:]:
            resumed, _ = steps.train(resumed, layout.put_batch(batch))
    # The schedule: 0 at step 0, 0.5 (1 - (1/2)^3) = 0.4375 at step 1, 0.5 from step 2 on.
    np.testing.assert_allclose(seen, [0, 0.4375, 0.5, 0.5, 0.5, 0.5], atol=1e-3)
    params, masks = jax.device_get((state.params, state.opt_state.masks))
    # Every masked weight is exactly zero; norms and biases are never masked.
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True):
        assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    assert np.all(masks["final_norm"]["scale"]) and np.all(
        masks["layers"]["blocks"]["mlp"]["wi"]["bias"]
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(state))


def test_prune_section_loads_and_checks():
    base = {"model": {"preset": "gpt2-tiny"}, "data": {"seq_len": 64}}
    cfg = config_from_dict({**base, "prune": {"sparsity": 0.9}})
    assert cfg.prune.enabled and cfg.prune.scope == "global"
    with pytest.raises(ValueError, match=r"prune\.scope"):
        config_from_dict({**base, "prune": {"scope": "row"}})
    with pytest.raises(ValueError, match="initial_sparsity"):
        PruneConfig(sparsity=0.1, initial_sparsity=0.5)
