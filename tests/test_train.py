"""Train steps in-process: overfitting, sharding presets == single device, pmap == jit,
gradient accumulation == the large batch, optimizers and schedules, restore onto another
mesh. Subprocess behaviour (SIGKILL resume, SIGTERM, two hosts) is in
test_train_process.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.checkpoint import CheckpointManager
from llm_jax.data.objectives import objective_spec
from llm_jax.models import ModelConfig, build
from llm_jax.parallel import MeshConfig, activation_sharding, logical_axes, make_mesh
from llm_jax.train.compile import (
    check_batch_size,
    compile_steps,
    pmap_train_step,
    replicate,
    state_layout,
)
from llm_jax.train.losses import loss_counts
from llm_jax.train.optimizer import OptimizerConfig, decay_mask, make_schedule
from llm_jax.train.step import make_eval_step

LLAMA = ModelConfig.preset("llama-tiny", d_model=64, num_layers=2, d_ff=128)
OPT = OptimizerConfig(learning_rate=3e-3, warmup_steps=1, schedule="constant")
# Comparisons of parameters use SGD with momentum: its update is linear in the gradient, so
# a reduction-order difference stays a rounding difference. (Adam divides by sqrt(v): the
# update of a weight whose gradient is ~0 is ~lr * sign(noise), not comparable.)
SGD = OptimizerConfig(
    name="sgd",
    learning_rate=0.1,
    warmup_steps=0,
    schedule="constant",
    momentum=0.9,
    weight_decay=0.01,
)


def clm_batch(b=8, t=16, seed=0, vocab=512):
    toks = np.asarray(jax.random.randint(jax.random.key(seed), (b, t + 1), 0, vocab))
    return {
        "tokens": toks[:, :-1].astype(np.int32),
        "targets": toks[:, 1:].astype(np.int32),
        "weights": np.ones((b, t), np.float32),
    }


def seq2seq_batch(b=8, s=12, t=8, seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    tgt = rng.integers(1, vocab, (b, t)).astype(np.int32)
    return {
        "encoder_tokens": rng.integers(1, vocab, (b, s)).astype(np.int32),
        "decoder_tokens": np.concatenate([np.zeros((b, 1), np.int32), tgt[:, :-1]], 1),
        "decoder_targets": tgt,
        "decoder_weights": np.ones((b, t), np.float32),
    }


def mlm_batch(b=8, t=16, seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    targets = rng.integers(5, vocab, (b, t)).astype(np.int32)
    weights = (rng.random((b, t)) < 0.15).astype(np.float32)
    weights[:, 1] = 1.0
    tokens = np.where(weights > 0, 4, targets).astype(np.int32)
    return {
        "tokens": tokens,
        "targets": targets,
        "weights": weights,
        "token_type_ids": np.repeat([[0] * (t // 2) + [1] * (t // 2)], b, 0).astype(np.int32),
        "segment_ids": np.ones((b, t), np.int32),
        "nsp_labels": rng.integers(0, 2, (b,)).astype(np.int32),
        "nsp_weights": np.ones((b,), np.float32),
    }


def make_trainer(cfg, opt, mesh, *, total_steps, objective, rules="dp", **step_kwargs):
    """(layout, objective, step kwargs): what `run_steps` compiles."""
    layout = state_layout(cfg, opt, mesh, total_steps=total_steps, rules=rules)
    return layout, objective, step_kwargs


def run_steps(trainer, batch, n):
    layout, objective, step_kwargs = trainer
    with activation_sharding(layout.mesh, layout.rules):
        steps = compile_steps(layout, objective, batch, **step_kwargs)
        state = steps.init()
        batch = layout.put_batch(batch)
        losses = []
        for _ in range(n):
            state, m = steps.train(state, batch)
            losses.append(float(m["loss"]))
    return losses, state


def one_device_mesh():
    return make_mesh(MeshConfig(), jax.devices()[:1])


def test_overfits_one_batch():
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, schedule="constant")
    trainer = make_trainer(LLAMA, opt, one_device_mesh(), total_steps=80, objective="clm")
    losses, _ = run_steps(trainer, clm_batch(b=4), 80)
    assert losses[0] > 5.5 and losses[-1] < 0.05, (losses[0], losses[-1])


CASES = {
    "clm": (LLAMA, clm_batch),
    "mlm": (ModelConfig.preset("bert-tiny"), mlm_batch),
    "seq2seq": (ModelConfig.preset("t5-tiny"), seq2seq_batch),
}
PRESETS = [
    ("clm", MeshConfig(rules="dp")),
    ("clm", MeshConfig(data=2, fsdp=4, rules="fsdp")),
    ("clm", MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp")),
    ("mlm", MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp")),
    ("seq2seq", MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp")),
]


@pytest.mark.parametrize(
    ("objective", "mesh_config"), PRESETS, ids=[f"{o}-{m.rules}" for o, m in PRESETS]
)
def test_sharded_equals_single_device(objective, mesh_config):
    cfg, make_batch = CASES[objective]
    batch = make_batch()
    ref_losses, ref_state = run_steps(
        make_trainer(cfg, SGD, one_device_mesh(), total_steps=3, objective=objective), batch, 3
    )
    trainer = make_trainer(
        cfg,
        SGD,
        make_mesh(mesh_config),
        total_steps=3,
        objective=objective,
        rules=mesh_config.rules,
    )
    losses, state = run_steps(trainer, batch, 3)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    if mesh_config.rules != "dp":
        sharded = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
        assert sharded, "no parameter was sharded"


def test_pmap_equals_jit():
    batch = clm_batch()
    mesh = make_mesh(MeshConfig(rules="dp"))
    trainer = make_trainer(LLAMA, SGD, mesh, total_steps=3, objective="clm")
    jit_losses, jit_state = run_steps(trainer, batch, 3)
    layout = trainer[0]
    n = jax.local_device_count()
    state = replicate(layout.init())
    shards = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
    step = pmap_train_step(layout.graphdef, layout.tx, "clm", learning_rate_fn=layout.schedule)
    losses = []
    for _ in range(3):
        state, m = step(state, shards)
        losses.append(float(m["loss"][0]))
    np.testing.assert_allclose(losses, jit_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(jit_state.params), strict=True):
        np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_gradient_accumulation_equals_large_batch(objective):
    cfg, make_batch = CASES[objective]
    sgd = dataclasses.replace(
        SGD, learning_rate=0.5, momentum=0.0, weight_decay=0.0, clip_grad_norm=0.0
    )
    batch = make_batch()
    if objective == "clm":  # uneven weights: the (sum, count) reduction must be global
        batch["weights"][:, :5] = 0.0
    big = make_trainer(cfg, sgd, one_device_mesh(), total_steps=2, objective=objective)
    acc = make_trainer(
        cfg, sgd, one_device_mesh(), total_steps=2, objective=objective, grad_accum_steps=4
    )
    big_losses, big_state = run_steps(big, batch, 2)
    acc_losses, acc_state = run_steps(acc, batch, 2)
    np.testing.assert_allclose(acc_losses, big_losses, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(acc_state.params), jax.tree.leaves(big_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_every_optimizer_reduces_the_loss(name):
    lr = {"adamw": 3e-3, "adafactor": 0.1, "lion": 3e-4, "sgd": 0.3}[name]
    opt = OptimizerConfig(name=name, learning_rate=lr, warmup_steps=0, schedule="constant")
    trainer = make_trainer(LLAMA, opt, one_device_mesh(), total_steps=10, objective="clm")
    losses, _ = run_steps(trainer, clm_batch(b=4), 10)
    assert losses[-1] < losses[0] - 0.3, losses


def test_weight_decay_spares_biases_and_norm_scales():
    axes = {
        "mlp": {"wi": {"kernel": ("layers", "embed", "mlp"), "bias": ("layers", "mlp")}},
        "attn": {"q": {"kernel": ("embed", "heads", "kv"), "bias": ("heads", "kv")}},
        "norm": {"scale": ("embed",)},
        "embed": {"embedding": ("vocab", "embed")},
        "mlm_bias": ("vocab",),
    }
    mask = decay_mask(axes)
    assert mask == {
        "mlp": {"wi": {"kernel": True, "bias": False}},
        "attn": {"q": {"kernel": True, "bias": False}},
        "norm": {"scale": False},
        "embed": {"embedding": True},
        "mlm_bias": False,
    }


@pytest.mark.parametrize("preset", ["gpt2-tiny", "bert-tiny", "t5-tiny"])
def test_weight_decay_by_axes_matches_the_parameter_names(preset):
    """Every real parameter: decayed iff it is not a bias or a norm scale."""
    model = nnx.eval_shape(lambda: build(ModelConfig.preset(preset), rngs=nnx.Rngs(0)))
    mask, _ = jax.tree_util.tree_flatten_with_path(decay_mask(logical_axes(model)))
    assert mask
    for path, decayed in mask:
        name = str(path[-1].key)
        assert decayed == (name not in ("bias", "scale", "mlm_bias")), (path, decayed)


def test_schedules_warm_up_then_decay():
    base = OptimizerConfig(learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1)
    cosine = make_schedule(base, 110)
    np.testing.assert_allclose(
        [cosine(0), cosine(5), cosine(10), cosine(110)], [0.0, 0.5, 1.0, 0.1], atol=1e-6
    )
    linear = make_schedule(
        OptimizerConfig(
            learning_rate=1.0, warmup_steps=10, schedule="linear", end_learning_rate_ratio=0.0
        ),
        110,
    )
    np.testing.assert_allclose([linear(60), linear(110)], [0.5, 0.0], atol=1e-6)
    inv = make_schedule(
        OptimizerConfig(learning_rate=1.0, warmup_steps=100, schedule="inverse_sqrt"), 1000
    )
    np.testing.assert_allclose([inv(100), inv(400)], [1.0, 0.5], rtol=1e-6)
    const = make_schedule(
        OptimizerConfig(learning_rate=1.0, warmup_steps=0, schedule="constant"), 10
    )
    assert float(const(7)) == 1.0


def test_bad_optimizer_config_names_the_choices():
    with pytest.raises(ValueError, match=r"optimizer.name='adam' is not one of \['adamw'"):
        OptimizerConfig(name="adam")
    with pytest.raises(ValueError, match="schedule='cos' is not one of"):
        OptimizerConfig(schedule="cos")


def test_batch_not_divisible_by_mesh_is_a_clear_error():
    mesh = make_mesh(MeshConfig(rules="dp"))
    msg = r"batch_size=12 does not divide evenly over 8 data shards .*e\.g\. 8, 16, 24, 32\."
    with pytest.raises(ValueError, match=msg):
        check_batch_size(12, mesh)
    with pytest.raises(ValueError, match=msg):
        trainer = make_trainer(LLAMA, OPT, mesh, total_steps=1, objective="clm")
        run_steps(trainer, clm_batch(b=12), 1)
    with pytest.raises(ValueError, match=r"batch size 8 is not divisible by grad_accum_steps=3"):
        check_batch_size(8, mesh, 3)
    with pytest.raises(ValueError, match=r"mesh .* needs 6 devices but 8"):
        make_mesh(MeshConfig(data=2, fsdp=3))


def test_restore_onto_a_different_mesh(tmp_path):
    batch = clm_batch()
    fsdp = make_trainer(
        LLAMA,
        OPT,
        make_mesh(MeshConfig(data=2, fsdp=4, rules="fsdp")),
        total_steps=2,
        objective="clm",
        rules="fsdp",
    )
    _, state = run_steps(fsdp, batch, 2)
    with CheckpointManager(tmp_path, save_interval_steps=1, async_save=False) as ckpt:
        ckpt.save(2, state, data_state={"step": 2}, config={"x": 1})
    tp = make_trainer(
        LLAMA,
        OPT,
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp")),
        total_steps=2,
        objective="clm",
        rules="fsdp_tp",
    )
    with CheckpointManager(tmp_path) as ckpt:
        restored = ckpt.restore(tp[0].abstract_state)
    assert restored.step == 2 and restored.data_state == {"step": 2}
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = restored.state.params["layers"]["blocks"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding == tp[0].state_sharding.params["layers"]["blocks"]["mlp"]["wi"]["kernel"]
    assert "tensor" in str(kernel.sharding.spec)


def test_nonfinite_step_is_skipped_when_asked():
    trainer = make_trainer(
        LLAMA, OPT, one_device_mesh(), total_steps=2, objective="clm", skip_nonfinite=True
    )
    layout = trainer[0]
    batch = clm_batch()
    batch["weights"][0, 0] = np.nan
    with activation_sharding(layout.mesh, layout.rules):
        steps = compile_steps(layout, "clm", batch, skip_nonfinite=True)
        state = steps.init()
        before = jax.tree.map(np.asarray, state.params)
        state, m = steps.train(state, layout.put_batch(batch))
    assert int(m["finite"]) == 0
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree.leaves(state.opt_state)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    )


def test_loss_counts_are_the_sums_of_the_weights_the_spec_names():
    spec = objective_spec("mlm")
    batch = mlm_batch()
    counts = jax.device_get(loss_counts(spec, batch))
    assert counts == {"mlm": batch["weights"].sum(), "nsp": 8.0}
    # Without a pair task there are no NSP rows, hence no NSP loss to count.
    no_pairs = {k: v for k, v in batch.items() if not k.startswith("nsp")}
    assert set(loss_counts(spec, no_pairs)) == {"mlm"}
    with pytest.raises(ValueError, match=r"weights its 'lm' loss by batch\['decoder_weights'\]"):
        loss_counts(objective_spec("seq2seq"), clm_batch())
    # NSP labels without their row weights would silently weigh padding rows: refused.
    bert = ModelConfig.preset("bert-tiny")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: build(bert, rngs=nnx.Rngs(0))))
    eval_step = make_eval_step(graphdef, "mlm")
    unweighted = {k: v for k, v in batch.items() if k != "nsp_weights"}
    with pytest.raises(ValueError, match="nsp_labels but no nsp_weights"):
        jax.eval_shape(eval_step, nnx.to_pure_dict(params), unweighted)
