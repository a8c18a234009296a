"""Knowledge distillation: the KL term against its NumPy twin, α = 0 is plain CE exactly,
clear errors for teachers that cannot teach, and a 2-step run from a tiny teacher."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from llm_jax.compress.distill import (
    Distillation,
    Teacher,
    check_teacher,
    distill_kl,
    hidden_cosine,
    layers_from_teacher,
)
from llm_jax.models import ModelConfig, build
from llm_jax.parallel import MeshConfig, activation_sharding, make_mesh
from llm_jax.parallel.mesh import logical_axes, logical_to_sharding
from llm_jax.train.compile import compile_steps, state_layout
from llm_jax.train.config import config_from_dict
from llm_jax.train.loop import train
from llm_jax.train.losses import LossConfig
from llm_jax.train.optimizer import OptimizerConfig
from tests.reference.compress_ref import distill_kl_ref

GPT = {"preset": "gpt2-tiny", "d_model": 32, "num_heads": 2, "d_ff": 64, "vocab_size": 97}
SGD = OptimizerConfig(name="sgd", learning_rate=0.1, warmup_steps=0, schedule="constant")


def test_kl_matches_the_numpy_twin():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 2, 5, 11)).astype(np.float32) * 3
    w = (rng.random((2, 5)) < 0.7).astype(np.float32)
    for temperature in (1.0, 2.0, 0.5):
        got = distill_kl(s, t, w, temperature)
        want = distill_kl_ref(s, t, w, temperature)
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5)
    # KL of a distribution with itself is 0; against another it is > 0.
    assert abs(float(distill_kl(t, t, w, 2.0)[0])) < 1e-5
    assert float(distill_kl(s, t, w, 2.0)[0]) > 0.1
    total, count = hidden_cosine(s, s, w)
    assert abs(float(total)) < 1e-5 and float(count) == w.sum()


def _teacher(cfg: ModelConfig, mesh, alpha: float) -> Teacher:
    model = build(cfg, rngs=nnx.Rngs(7))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    sharding = logical_to_sharding(params, logical_axes(model), mesh, "dp")
    params = jax.device_put(params, sharding)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    recipe = Distillation(graphdef, "clm", "lm", 2.0, {"kd": alpha * 4.0, "lm": 1.0 - alpha})
    return Teacher(recipe, params, sharding, abstract, cfg, {})


def _batch(b=4, t=8, vocab=97):
    toks = np.random.default_rng(1).integers(0, vocab, (b, t + 1)).astype(np.int32)
    return {"tokens": toks[:, :-1], "targets": toks[:, 1:], "weights": np.ones((b, t), np.float32)}


def _run(layout, batch, teacher, n=2):
    with activation_sharding(layout.mesh, layout.rules):
        steps = compile_steps(layout, "clm", batch, teacher=teacher, grad_accum_steps=2)
        state, out = steps.init(), []
        for _ in range(n):
            state, m = steps.train(state, layout.put_batch(batch))
            out.append({k: float(v) for k, v in m.items()})
    return out, jax.device_get(state.params)


def test_alpha_zero_equals_plain_cross_entropy_exactly():
    student = ModelConfig.from_dict({**GPT, "num_layers": 1})
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    layout = state_layout(student, SGD, mesh, total_steps=2)
    teacher_cfg = ModelConfig.from_dict({**GPT, "num_layers": 2})
    batch = _batch()
    plain, plain_params = _run(layout, batch, None)
    kd, kd_params = _run(layout, batch, _teacher(teacher_cfg, mesh, 0.0))
    assert [m["loss"] for m in kd] == [m["loss"] for m in plain]
    assert kd[0]["kd_loss"] > 0  # the teacher did run
    jax.tree.map(np.testing.assert_array_equal, kd_params, plain_params)
    # With α > 0 the KL term moves the student.
    mixed, _ = _run(layout, batch, _teacher(teacher_cfg, mesh, 0.5))
    expected = 0.5 * 4.0 * mixed[0]["kd_loss"] + 0.5 * mixed[0]["lm_loss"]
    np.testing.assert_allclose(mixed[0]["loss"], expected, rtol=1e-5)


def test_teachers_that_cannot_teach_are_clear_errors():
    student = ModelConfig.from_dict({**GPT, "num_layers": 1})
    with pytest.raises(ValueError, match="vocabulary has 98 ids"):
        check_teacher(student, student.replace(vocab_size=98), "clm", False)
    with pytest.raises(ValueError, match="equal widths"):
        check_teacher(student, student.replace(d_model=64), "clm", True)
    with pytest.raises(ValueError, match=r"data\.objective in"):
        check_teacher(student, student, "seq2seq", False)
    bert = ModelConfig.preset("bert-tiny", vocab_size=97)
    with pytest.raises(ValueError, match="teacher is a gpt"):
        check_teacher(bert, student, "mlm", False)
    with pytest.raises(ValueError, match=r"set train\.teacher"):
        config_from_dict({"model": GPT, "train": {"distill_init": "alternate"}})


def test_student_from_every_other_teacher_layer():
    teacher_cfg = ModelConfig.from_dict({**GPT, "num_layers": 4})
    student_cfg = teacher_cfg.replace(num_layers=2)
    t = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(build(teacher_cfg, rngs=nnx.Rngs(1)))))
    fresh = jax.tree.map(
        np.asarray, nnx.to_pure_dict(nnx.state(build(student_cfg, rngs=nnx.Rngs(2))))
    )
    got = layers_from_teacher(student_cfg, teacher_cfg, t, fresh)
    q = t["layers"]["blocks"]["self_attn"]["q"]["kernel"]
    np.testing.assert_array_equal(got["layers"]["blocks"]["self_attn"]["q"]["kernel"], q[[0, 2]])
    np.testing.assert_array_equal(got["embed"]["embedding"], t["embed"]["embedding"])


def test_mlm_student_losses():
    """The MLM path (BERT encode + MLM head; NSP kept) with the DistilBERT weights."""
    cfg = ModelConfig.preset("bert-tiny", d_model=32, num_heads=2, d_ff=64, vocab_size=97)
    teacher, student = (
        build(cfg, rngs=nnx.Rngs(1)),
        build(cfg.replace(num_layers=1), rngs=nnx.Rngs(2)),
    )
    graphdef, state = nnx.split(teacher)
    recipe = Distillation(graphdef, "mlm", "mlm", 2.0, {"kd": 20.0, "mlm": 2.0, "cos": 1.0})
    rng = np.random.default_rng(0)
    targets = rng.integers(5, 97, (2, 8)).astype(np.int32)
    weights = np.zeros((2, 8), np.float32)
    weights[:, 2] = 1
    batch = {"tokens": np.where(weights > 0, 4, targets), "targets": targets, "weights": weights,
             "segment_ids": np.ones((2, 8), np.int32), "nsp_labels": np.array([0, 1], np.int32),
             "nsp_weights": np.ones(2, np.float32)}  # fmt: skip
    teacher_params = nnx.to_pure_dict(state)

    @jax.jit
    def losses_of(params):
        return recipe.losses(nnx.merge(graphdef, params), teacher_params, batch, None, LossConfig())

    s_graph, s_state = nnx.split(student)
    losses = jax.jit(
        lambda p: recipe.losses(nnx.merge(s_graph, p), teacher_params, batch, None, LossConfig())
    )(s_state)
    assert sorted(losses) == ["cos", "kd", "mlm", "nsp"]
    assert float(losses["kd"][1]) == 2 and float(losses["cos"][1]) == 16
    assert all(np.isfinite(float(s)) and float(s) > 0 for s, _ in losses.values())
    # A student identical to its teacher has no KL and no cosine distance.
    same = losses_of(state)
    assert abs(float(same["kd"][0])) < 1e-5 and abs(float(same["cos"][0])) < 1e-4


def test_two_step_distillation_run_from_a_tiny_teacher(tmp_path, corpora):
    objective = "clm"
    text = tmp_path / "text.txt"
    text.write_text((corpora / "shakespeare.txt").read_text(encoding="utf-8")[:30000])
    bert = {"preset": "bert-tiny", "d_model": 32, "num_heads": 2, "d_ff": 64}
    model = dict(GPT if objective == "clm" else bert, num_layers=2)
    model.pop("vocab_size", None)
    data = {"paths": [str(text)], "tokenizer_type": "bpe", "vocab_size": 600, "seq_len": 32,
            "batch_size": 8, "objective": objective, "validation_fraction": 0.1,
            "cache_dir": str(tmp_path / "c")}  # fmt: skip
    run = {"steps": 1, "eval_every": 0, "checkpoint_every": 1, "progress": False}
    teacher = train(config_from_dict({"workdir": str(tmp_path / "t"), "model": model, "data": data,
                                      "train": run}))  # fmt: skip
    student = {**model, "num_layers": 1}
    d = {"workdir": str(tmp_path / "s"), "model": student,
         "data": {**data, "tokenizer_path": str(teacher.workdir / "tokenizer")},
         "train": {**run, "steps": 2, "eval_every": 2, "eval_batches": 1,
                   "teacher": str(teacher.workdir),
                   "distill_preset": "distilbert", "distill_init": "alternate",
                   "grad_accum_steps": 2}}  # fmt: skip
    result = train(config_from_dict(d))
    assert np.isfinite(result.losses[2]) and np.isfinite(result.eval_losses[2])


def test_a_hugging_face_folder_is_a_teacher():
    from pathlib import Path

    from llm_jax.compress.distill import read_teacher

    folder = Path(__file__).parent / "fixtures" / "hf" / "gpt2"
    cfg, params = read_teacher(str(folder))
    assert cfg.family == "gpt" and "embed" in params
    with pytest.raises(ValueError, match="no such folder"):
        read_teacher(str(folder / "missing"))
    student = cfg.replace(num_layers=1, vocab_size=cfg.vocab_size + 1)
    with pytest.raises(ValueError, match=r"data\.tokenizer_path"):
        check_teacher(student, cfg, "clm", False)


def test_a_resumed_distillation_checks_its_teacher_and_resumes_exactly(
    tmp_path, corpora, monkeypatch
):
    import shutil

    from llm_jax.convert import save_checkpoint
    from llm_jax.train import loop

    model = {**GPT, "vocab_size": 384}  # the char tokenizer's 321 ids fit
    cfg = ModelConfig.from_dict({**model, "num_layers": 2})
    teacher, kept = tmp_path / "teacher", tmp_path / "kept"
    save_checkpoint(build(cfg, rngs=nnx.Rngs(0)), teacher)
    text = tmp_path / "text.txt"
    text.write_text((corpora / "shakespeare.txt").read_text(encoding="utf-8")[:20000])
    d = {"workdir": str(tmp_path / "whole"), "model": {**model, "num_layers": 1},
         "data": {"paths": [str(text)], "tokenizer_type": "char", "seq_len": 16,
                  "batch_size": 8, "objective": "clm", "cache_dir": str(tmp_path / "c")},
         "train": {"steps": 4, "checkpoint_every": 2, "eval_every": 0, "progress": False,
                   "async_checkpoint": False, "teacher": str(teacher)}}  # fmt: skip
    whole = train(config_from_dict(d))
    half = tmp_path / "half"  # the whole run as it was at its step-2 checkpoint
    shutil.copytree(whole.workdir, half, ignore=shutil.ignore_patterns("4"))
    # The run's own config.json (with its teacher record) loads back as the resume config.
    saved = json.loads((half / "config.json").read_text())
    assert saved["teacher"]["fingerprint"]
    resume = config_from_dict({**saved, "workdir": str(half)})
    assert resume.train == config_from_dict(d).train

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled before the teacher was checked")

    shutil.move(teacher, kept)  # another model in the teacher's place
    save_checkpoint(build(cfg, rngs=nnx.Rngs(1)), teacher)
    with monkeypatch.context() as m:
        m.setattr(loop, "compile_steps", no_compile)
        changed = r"the teacher at .* changed since .* point train.teacher back to it, or start"
        with pytest.raises(ValueError, match=changed):
            train(resume)
        shutil.rmtree(teacher)
        with pytest.raises(ValueError, match="teacher is gone: a resumed distillation needs"):
            train(resume)
        no_teacher = dataclasses.replace(resume.train, teacher=None)
        with pytest.raises(ValueError, match=r"distils from .*; set train.teacher=.* to resume"):
            train(dataclasses.replace(resume, train=no_teacher))
    shutil.move(kept, teacher)  # the original back: the resumed run equals the whole one
    resumed = train(resume)
    assert resumed.losses[3] == whole.losses[3] and resumed.losses[4] == whole.losses[4]


def test_pmap_distillation_equals_the_single_device_step():
    from llm_jax.train.compile import pmap_train_step, replicate

    student = ModelConfig.from_dict({**GPT, "num_layers": 1})
    mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    layout = state_layout(student, SGD, mesh, total_steps=2)
    teacher = _teacher(ModelConfig.from_dict({**GPT, "num_layers": 2}), mesh, 0.5)
    batch = _batch(b=16)
    single, single_params = _run(layout, batch, teacher, n=1)  # a pmap step is slow on CPU
    n = jax.local_device_count()
    assert n == 8  # tests/conftest.py's fake CPU devices
    step = pmap_train_step(
        layout.graphdef, layout.tx, "clm", teacher=teacher, grad_accum_steps=2,
        learning_rate_fn=layout.schedule,
    )  # fmt: skip
    state = replicate(layout.init())
    shards = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)
    for want in single:
        state, m = step(state, shards)
        for k in ("loss", "kd_loss", "lm_loss"):
            np.testing.assert_allclose(float(m[k][0]), want[k], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single_params), strict=True):
        np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_mfu_counts_the_teachers_forward_by_hand():
    from llm_jax.data.objectives import objective_spec
    from llm_jax.train.flops import flops_and_tokens, teacher_flops_per_token
    from llm_jax.train.metrics import Throughput, format_postfix

    d, f, v, t = 32, 64, 97, 16  # GPT's widths, 16 tokens
    block = 4 * d * d + 2 * d * f  # q, k, v, o and the MLP's two matrices
    teacher_cfg = ModelConfig.from_dict({**GPT, "num_layers": 2})
    student_cfg = ModelConfig.from_dict({**GPT, "num_layers": 1})
    spec, batch = objective_spec("clm"), _batch(b=4, t=t)
    # Forward only for the teacher: 2·N + 4·L·T·D (QKᵀ and AV); 6·N + 12·L·T·D to train.
    teacher = 2 * (2 * block + d * v) + 4 * 2 * t * d
    student = 6 * (block + d * v) + 12 * 1 * t * d
    assert teacher_flops_per_token(teacher_cfg, spec, batch) == teacher
    assert flops_and_tokens(student_cfg, spec, batch) == (student, 4 * t)
    # A BERT teacher: its MLM transform [D, E] and decoder [E, V]; no pooler, no NSP.
    bert = ModelConfig.preset("bert-tiny", vocab_size=v)
    bd, bf = bert.d_model, bert.d_ff
    bert_n = 2 * (4 * bd * bd + 2 * bd * bf) + bd * bd + bd * v
    got = teacher_flops_per_token(bert, objective_spec("mlm"), {"tokens": batch["tokens"]})
    assert got == 2 * bert_n + 4 * 2 * t * bd
    now = [0.0]
    meter = Throughput(
        skip_steps=0,
        flops_per_token=student,
        teacher_flops_per_token=teacher,
        peak_flops_per_device=1e6,
        clock=lambda: now[0],
    )
    meter.step(4 * t)
    now[0] = 2.0  # 32 tokens/s
    rates = meter.rates()
    assert rates["mfu"] == pytest.approx(32 * (student + teacher) / 1e6, rel=1e-12)
    assert rates["teacher_mfu"] == pytest.approx(32 * teacher / 1e6, rel=1e-12)
    assert f"(teacher {100 * rates['teacher_mfu']:.1f}%)" in format_postfix(rates)
