"""Fine-tuning core: the init/finetune config sections, the trainable/frozen partition,
starting from our checkpoint or a Hugging Face folder, frozen parameters unchanged and
without optimizer state, exact resume, and the errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from llm_jax.convert import restore_model
from llm_jax.convert.hf import params_of
from llm_jax.convert.hf_weights import flatten_tree
from llm_jax.finetune import FinetuneConfig, Partition, partition_for
from llm_jax.models import ModelConfig
from llm_jax.train.config import config_from_dict
from llm_jax.train.hooks import StopOnSignal
from llm_jax.train.loop import setup, train

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
# Many runs here restore and retrain the same tiny configs: one compile each (conftest).
pytestmark = pytest.mark.usefixtures("xla_cache")

BERT = {
    "preset": "bert-tiny",
    "d_model": 32,
    "num_layers": 2,
    "num_heads": 2,
    "d_ff": 64,
    "max_position_embeddings": 64,
}


def _flat(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten_tree(params_of(model)).items()}


def _shapes(cfg: ModelConfig):
    from flax import nnx

    from llm_jax.models import build

    return nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    )


# Partition ----------------------------------------------------------------------------------


def test_partition_split_combine_round_trip_and_layer_cut():
    cfg = ModelConfig.from_dict({**BERT, "vocab_size": 50})
    shapes = _shapes(cfg)
    params = jax.tree.map(
        lambda s: np.random.default_rng(0).normal(size=s.shape).astype(np.float32), shapes
    )
    part = partition_for(cfg, FinetuneConfig(trainable="top:1"), shapes)
    trainable, frozen = part.split(params)
    flat_t = flatten_tree(trainable)
    assert flat_t["layers/blocks/mlp/wi/kernel"].shape[0] == 1  # only the top layer trains
    assert "embed/embedding" not in flat_t and "embed/embedding" in frozen
    np.testing.assert_array_equal(
        frozen["layers/blocks/mlp/wi/kernel:below"],
        params["layers"]["blocks"]["mlp"]["wi"]["kernel"][:1],
    )
    back = part.combine(trainable, frozen)
    for k, v in flatten_tree(params).items():
        np.testing.assert_array_equal(np.asarray(flatten_tree(back)[k]), v)
    bottom = partition_for(cfg, FinetuneConfig(trainable="bottom:1"), shapes)
    assert bottom.parts["layers/blocks/mlp/wi/kernel"] == (0, 1)
    assert partition_for(cfg, FinetuneConfig(), shapes).is_everything


def test_partition_t5_sides_and_no_embeddings():
    cfg = ModelConfig.preset("t5-tiny", vocab_size=40)
    shapes = _shapes(cfg)
    enc = partition_for(cfg, FinetuneConfig(trainable="encoder"), shapes)
    assert enc.parts["encoder/blocks/self_attn/q/kernel"] is True
    assert enc.parts["decoder/blocks/self_attn/q/kernel"] is False
    assert enc.parts["embed/embedding"] is False
    dec = partition_for(cfg, FinetuneConfig(trainable="decoder"), shapes)
    assert dec.parts["decoder_norm/scale"] is True and dec.parts["encoder_norm/scale"] is False
    noemb = partition_for(cfg, FinetuneConfig(trainable="no_embeddings"), shapes)
    assert noemb.parts["embed/embedding"] is False and noemb.parts["encoder_norm/scale"] is True


@pytest.mark.parametrize(
    ("trainable", "model", "match"),
    [
        ("top:3", BERT, "asks for 3 layers but the model has 2"),
        ("encoder", BERT, "this is a bert model"),
        ("top:1", {**BERT, "share_layers": True}, "shares one block"),
        ("head", BERT, "leaves nothing to train"),
    ],
)
def test_partition_errors_name_the_fix(trainable, model, match):
    cfg = ModelConfig.from_dict({**model, "vocab_size": 50})
    with pytest.raises(ValueError, match=match):
        partition_for(cfg, FinetuneConfig(trainable=trainable), _shapes(cfg))


def test_partition_rejects_another_tree():
    part = Partition({"a": True})
    with pytest.raises(ValueError, match="do not match the partition"):
        part.split({"b": np.zeros(2)})


# Config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"finetune": {"method": "lora"}}, "set init.from_checkpoint"),
        ({"finetune": {"trainable": "top:2"}}, "set init.from_checkpoint"),
        ({"finetune": {"trainable": "middle"}}, "finetune.trainable='middle'"),
        ({"finetune": {"lora_targets": ["qkv"]}}, "choose from"),
        ({"init": {"from_hf": "a", "from_checkpoint": "b"}}, "not both"),
        ({"init": {"step": 3}}, "init.step"),
    ],
)
def test_config_errors(d, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict({"model": {"preset": "gpt2-tiny"}, **d})


def test_config_model_section_optional_with_init():
    cfg = config_from_dict({"init": {"from_hf": "somewhere"}})
    assert cfg.model == {} and cfg.init.source == "somewhere"
    with pytest.raises(ValueError, match="'model' section"):
        config_from_dict({"data": {}})


# Runs -----------------------------------------------------------------------------------------


def _separable(path: Path, lines: list[str]) -> Path:
    """A fastText file whose label is told by one marker word (a separable toy task)."""
    rows = []
    for i, line in enumerate(lines):
        label, word = ("pos", "splendid") if i % 2 else ("neg", "wretched")
        rows.append(f"__label__{label} {word} {line}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory, corpora) -> Path:
    """A tiny BERT pretrained for 2 steps (MLM + NSP) on the Shakespeare excerpt."""
    root = tmp_path_factory.mktemp("bert_base")
    text = root / "text.txt"
    text.write_text((corpora / "shakespeare.txt").read_text(encoding="utf-8")[:60000])
    cfg = config_from_dict(
        {
            "workdir": str(root / "run"),
            "model": BERT,
            "data": {
                "paths": [str(text)],
                "objective": "mlm",
                "pair_task": "nsp",
                "tokenizer_type": "unigram",
                "vocab_size": 500,
                "doc_split": "line",
                "seq_len": 32,
                "batch_size": 8,
                "cache_dir": str(root / "cache"),
            },
            "train": {"steps": 2, "eval_every": 0, "checkpoint_every": 2, "progress": False},
        }
    )
    train(cfg)
    return root / "run"


def _cls_config(tmp: Path, base: Path, corpora: Path, **finetune) -> dict:
    lines = (corpora / "shakespeare.txt").read_text(encoding="utf-8").splitlines()
    lines = [x for x in lines if len(x.split()) > 3][:96]
    data = _separable(tmp / "cls.txt", lines)
    return {
        "workdir": str(tmp / "ft"),
        "init": {"from_checkpoint": str(base)},
        "finetune": finetune,
        "data": {
            "paths": [str(data)],
            "objective": "classification",
            "format": "fasttext",
            "seq_len": 32,
            "batch_size": 8,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"steps": 3, "eval_every": 0, "checkpoint_every": 3, "progress": False},
        "optimizer": {
            "learning_rate": 1e-2,
            "warmup_steps": 0,
            "weight_decay": 0.1,
            "schedule": "constant",
        },
    }


def test_top1_trains_only_the_top_layer_and_head(bert_base, corpora, tmp_path, capfd):
    d = _cls_config(tmp_path, bert_base, corpora, trainable="top:1")
    result = train(config_from_dict(d))
    err = capfd.readouterr().err
    assert "new (initialised fresh): classifier/bias, classifier/kernel" in err
    assert "trainable parameters:" in err and "optimizer state:" in err
    assert "not used (heads turned off): mlm_bias" in err
    base = _flat(restore_model(bert_base).model)
    tuned = _flat(restore_model(result.workdir).model)
    assert "classifier/kernel" in tuned and "mlm_bias" not in tuned
    for k, v in tuned.items():
        if k.startswith("classifier"):
            continue
        if "/blocks/" in k:  # [L=2, ...]: layer 0 frozen, layer 1 trained
            np.testing.assert_array_equal(v[0], base[k][0])
            assert not np.array_equal(v[1], base[k][1]), k
        elif k.startswith("pooler"):
            assert not np.array_equal(v, base[k]), k
        else:
            np.testing.assert_array_equal(v, base[k])  # embeddings bit-identical
    # The checkpoint holds only what trained; no optimizer state for frozen parameters.
    saved = json.loads((result.workdir / "config.json").read_text())
    assert saved["init"]["fingerprint"] and saved["model"]["num_labels"] == 2
    with (
        StopOnSignal() as stop,
        setup(config_from_dict({**d, "train": {**d["train"], "steps": 4}}), stop) as run,
    ):
        opt_paths = {
            "/".join(str(getattr(k, "key", k)) for k in p)
            for p, _ in jax.tree_util.tree_leaves_with_path(run.state.opt_state)
        }
        assert not any("embed" in p for p in opt_paths)
        mu = [
            x
            for p, x in jax.tree_util.tree_leaves_with_path(run.state.opt_state)
            if "wi" in str(p) and x.ndim == 3
        ]
        assert mu and all(x.shape[0] == 1 for x in mu)  # moments of the top layer only


def test_full_finetuning_separates_a_separable_set(bert_base, corpora, tmp_path):
    d = _cls_config(tmp_path, bert_base, corpora)
    d["data"]["validation_paths"] = d["data"]["paths"]
    d["train"].update(steps=40, eval_every=40, eval_batches=12, checkpoint_every=40)
    result = train(config_from_dict(d))
    rows = [json.loads(x) for x in result.metrics_path.read_text().splitlines()]
    accuracy = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert accuracy == [1.0]


def test_finetune_resume_is_exact(bert_base, corpora, tmp_path):
    d = _cls_config(tmp_path, bert_base, corpora, trainable="top:1")
    d["train"].update(steps=4, checkpoint_every=2)
    whole = train(config_from_dict(d))
    d2 = {**d, "workdir": str(tmp_path / "ft2"), "train": {**d["train"], "steps": 2}}
    train(config_from_dict(d2))
    resumed = train(config_from_dict({**d2, "train": d["train"]}))
    assert resumed.losses[4] == whole.losses[4] and resumed.losses[3] == whole.losses[3]


def test_from_hf_reproduces_the_fixture_logits_at_step_0(tmp_path):
    from llm_jax.convert.hf import model_from_params
    from tests.fixtures.hf_checks import our_outputs, read_expected

    corpus = tmp_path / "t.txt"
    corpus.write_text("hello world, this is a small text for the data pipeline.\n" * 50)
    cfg = config_from_dict(
        {
            "workdir": str(tmp_path / "run"),
            "init": {"from_hf": str(FIXTURES / "gpt2")},
            "model": {"dropout_rate": 0.0},
            "data": {
                "paths": [str(corpus)],
                "seq_len": 16,
                "batch_size": 8,
                "cache_dir": str(tmp_path),
            },
            "train": {"steps": 1, "progress": False},
        }
    )
    with StopOnSignal() as stop, setup(cfg, stop) as run:
        params = run.steps.full_params(run.state.params)
        model = model_from_params(cfg_model(run), jax.device_get(params))
    info, expected = read_expected(FIXTURES / "gpt2")
    ours = our_outputs(model, "gpt2", info)
    np.testing.assert_allclose(ours["logits"], expected["logits"], rtol=1e-4, atol=1e-4)
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


def cfg_model(run) -> ModelConfig:
    return ModelConfig.from_dict(run.resolved["model"])


# Bad input --------------------------------------------------------------------------------------


def test_bad_inputs_fail_before_compiling(bert_base, corpora, tmp_path):
    d = _cls_config(tmp_path, bert_base, corpora)
    with pytest.raises(ValueError, match=r"model.d_model=48 differs from the base model's 32"):
        train(config_from_dict({**d, "model": {"d_model": 48}}))
    with pytest.raises(ValueError, match=r"model\.preset"):
        train(config_from_dict({**d, "model": {"preset": "bert-tiny"}}))
    with pytest.raises(ValueError, match=r"init\.from_checkpoint="):
        train(config_from_dict({**d, "init": {"from_checkpoint": str(tmp_path)}}))
    with pytest.raises(ValueError, match=r"no config\.json there"):
        train(config_from_dict({**d, "init": {"from_hf": str(tmp_path)}}))
    with pytest.raises(ValueError, match="asks for 5 layers"):
        train(config_from_dict({**d, "finetune": {"trainable": "top:5"}}))
    dev = tmp_path / "dev.txt"
    dev.write_text("__label__neutral so so\n__label__pos splendid\n")
    unseen = {**d, "data": {**d["data"], "validation_paths": [str(dev)]}}
    with pytest.raises(ValueError, match=r"\['neutral'\]"):
        train(config_from_dict(unseen))
    other = tmp_path / "other_tok"
    big = config_from_dict(
        {
            **d,
            "data": {
                **d["data"],
                "tokenizer_path": str(other),
                "vocab_size": 650,
                "tokenizer_type": "unigram",
            },
        }
    )
    with pytest.raises(ValueError, match="does not belong to this model"):
        train(big)


def _changed(base: dict, tuned: dict) -> set[str]:
    return {k for k, v in tuned.items() if k not in base or not np.array_equal(v, base[k])}


def test_lora_run_trains_only_adapters_and_head_and_resumes_exactly(bert_base, corpora, tmp_path):
    d = _cls_config(tmp_path, bert_base, corpora, method="lora", lora_rank=4)
    d["data"]["test_paths"] = d["data"]["paths"]
    d["train"].update(steps=4, checkpoint_every=2, eval_every=4, eval_batches=2)
    whole = train(config_from_dict(d))
    base = _flat(restore_model(bert_base).model)
    tuned = _flat(restore_model(whole.workdir).model)
    changed = _changed(base, tuned)
    assert changed and all(k.startswith("classifier") or "/lora_" in k for k in changed)
    assert any(k.endswith("q/lora_b") for k in changed) and any("v/lora_a" in k for k in changed)
    from llm_jax.finetune.peft import save_peft_adapter

    model = restore_model(whole.workdir).model
    with pytest.raises(ValueError, match="classification head"):
        save_peft_adapter(model.cfg, params_of(model), tmp_path / "adapter")
    import orbax.checkpoint as ocp

    state_dir = restore_model(whole.workdir).step_dir / "state"
    saved = flatten_tree(ocp.PyTreeCheckpointHandler().metadata(state_dir).tree["params"])
    assert saved and all(k.startswith("classifier") or "/lora_" in k for k in saved)  # no base
    d2 = {**d, "workdir": str(tmp_path / "ft2"), "train": {**d["train"], "steps": 2}}
    train(config_from_dict(d2))
    resumed = train(config_from_dict({**d2, "train": d["train"]}))
    assert resumed.losses[3] == whole.losses[3] and resumed.losses[4] == whole.losses[4]


def test_prompt_tuning_run_changes_only_the_prompt_and_head(bert_base, corpora, tmp_path):
    d = _cls_config(tmp_path, bert_base, corpora, method="prompt_tuning", prompt_length=4)
    d["finetune"]["prompt_init"] = "labels"
    result = train(config_from_dict(d))
    base = _flat(restore_model(bert_base).model)
    tuned = _flat(restore_model(result.workdir).model)
    assert tuned["prompt"].shape == (4, 32)
    assert _changed(base, tuned) == {"prompt", "classifier/kernel", "classifier/bias"}
    too_long = {**d, "data": {**d["data"], "seq_len": 62}, "workdir": str(tmp_path / "long")}
    with pytest.raises(ValueError, match="prompt_length"):
        train(config_from_dict(too_long))


def test_instruct_lora_on_an_exported_gpt(tmp_path, corpora):
    """Pretrain a tiny GPT, export it as a Hugging Face folder, LoRA-tune it on prompt /
    response pairs from that folder (its tokenizer drives the data), export merged."""
    from llm_jax.convert import load_hf, save_hf

    text = tmp_path / "text.txt"
    text.write_text((corpora / "shakespeare.txt").read_text(encoding="utf-8")[:60000])
    gpt = {"preset": "gpt2-tiny", "d_model": 32, "num_layers": 2, "num_heads": 2, "d_ff": 64,
           "max_position_embeddings": 256}  # fmt: skip
    base_run = train(
        config_from_dict({
            "workdir": str(tmp_path / "gpt"), "model": gpt,
            "data": {"paths": [str(text)], "tokenizer_type": "bpe", "vocab_size": 600,
                     "seq_len": 32, "batch_size": 8, "cache_dir": str(tmp_path / "c")},
            "train": {"steps": 1, "eval_every": 0, "checkpoint_every": 1, "progress": False},
        })
    )  # fmt: skip
    hf = tmp_path / "gpt_hf"
    save_hf(restore_model(base_run.workdir).model, hf, tokenizer=base_run.workdir / "tokenizer")
    d = {
        "workdir": str(tmp_path / "lora"), "init": {"from_hf": str(hf)},
        "finetune": {"method": "lora", "lora_rank": 4, "lora_dropout": 0.1},
        "data": {"paths": [str(corpora / "instruct-en-es.jsonl")], "format": "jsonl",
                 "objective": "instruct", "seq_len": 255, "batch_size": 8,
                 "validation_fraction": 0.1,
                 "cache_dir": str(tmp_path / "c")},
        "train": {"steps": 2, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2,
                  "progress": False},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 0},
    }  # fmt: skip
    result = train(config_from_dict(d))
    assert np.isfinite(result.losses[2]) and np.isfinite(result.eval_losses[2])
    tuned = restore_model(result.workdir).model
    assert tuned.cfg.lora_rank == 4
    save_hf(tuned, tmp_path / "merged")  # merged on export
    merged = load_hf(tmp_path / "merged")
    tokens = np.arange(1, 17, dtype=np.int32)[None]
    np.testing.assert_allclose(merged(tokens), tuned(tokens), rtol=1e-4, atol=1e-5)
    # The adapters as a PEFT folder start a new run (finetune.lora_from) exactly where
    # this one ended.
    from llm_jax.cli import main

    adapter = tmp_path / "adapter"
    argv = ["convert", "--from-checkpoint", str(result.workdir), "--to-hf", str(adapter)]
    assert main([*argv, "--adapters-only"]) == 0
    d2 = {**d, "workdir": str(tmp_path / "again")}
    d2["finetune"] = {**d["finetune"], "lora_from": str(adapter), "lora_rank": 2}
    with StopOnSignal() as stop, setup(config_from_dict(d2), stop) as run:
        start = flatten_tree(jax.device_get(run.steps.full_params(run.state.params)))
        assert run.resolved["model"]["lora_rank"] == 4  # the adapter's rank wins
    for k, v in _flat(tuned).items():
        np.testing.assert_allclose(start[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


def test_partitioned_step_sharded_equals_single_device():
    """top:1 + LoRA on a GQA LLaMA: one train step on an fsdp_tp mesh of 8 fake devices ==
    on one device (loss, and every trainable parameter after the update)."""
    from llm_jax.parallel import MeshConfig, activation_sharding, make_mesh
    from llm_jax.train.compile import compile_steps, state_layout
    from llm_jax.train.optimizer import OptimizerConfig

    cfg = ModelConfig.preset(
        "llama-tiny", vocab_size=128, d_model=64, num_layers=2, d_ff=128, lora_rank=4
    )
    shapes = _shapes(cfg)
    part = partition_for(cfg, FinetuneConfig(method="lora", trainable="top:1"), shapes)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    toks = rng.integers(0, 128, (8, 17)).astype(np.int32)
    batch = {
        "tokens": toks[:, :-1],
        "targets": toks[:, 1:],
        "weights": np.ones((8, 16), np.float32),
    }
    opt = OptimizerConfig(name="sgd", learning_rate=0.1, warmup_steps=0, schedule="constant")
    out = []
    for mesh_cfg, devices in (
        (MeshConfig(), jax.devices()[:1]),
        (MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"), jax.devices()),
    ):
        mesh = make_mesh(mesh_cfg, devices)
        layout = state_layout(cfg, opt, mesh, total_steps=1, rules=mesh_cfg.rules, partition=part)
        with activation_sharding(mesh, layout.rules):
            trainable, frozen = layout.split(params)
            steps = compile_steps(layout, "clm", batch, frozen=frozen)
            state, metrics = steps.train(layout.init_from(trainable), layout.put_batch(batch))
        out.append((float(metrics["loss"]), jax.device_get(state.params)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    for k, v in flatten_tree(out[0][1]).items():
        np.testing.assert_allclose(flatten_tree(out[1][1])[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert set(flatten_tree(out[0][1])) == set(part.trainable_paths())


def test_t5_translation_with_a_frozen_decoder_decodes_and_scores(tmp_path, corpora, capfd):
    """T5 from our checkpoint with trainable=encoder: the decoder stays bit-identical and the
    end of the run beam-decodes the held-out verses and prints BLEU/chrF."""
    import flax.nnx as nnx

    from llm_jax.convert import save_checkpoint
    from llm_jax.data import train_tokenizer
    from llm_jax.models import build

    pairs = corpora / "bible-en-es.tsv"
    tok = train_tokenizer(pairs, model_type="unigram", vocab_size=400, num_sentinels=0)
    cfg = ModelConfig.preset(
        "t5-tiny", vocab_size=tok.vocab_size, d_model=32, num_heads=2, d_ff=64, num_layers=1
    )
    save_checkpoint(build(cfg, rngs=nnx.Rngs(0)), tmp_path / "t5", tokenizer=tok)
    d = {
        "workdir": str(tmp_path / "ft"), "init": {"from_checkpoint": str(tmp_path / "t5")},
        "finetune": {"trainable": "encoder"},
        "data": {"paths": [str(pairs)], "format": "tsv", "objective": "seq2seq",
                 "source_column": 1, "target_column": 2, "seq_len": 32, "target_seq_len": 32,
                 "batch_size": 8, "validation_fraction": 0.02, "validation_split": "last",
                 "cache_dir": str(tmp_path / "c")},
        "train": {"steps": 2, "eval_every": 0, "checkpoint_every": 2, "progress": False,
                  "eval_generate_examples": 8, "eval_beams": 2},
    }  # fmt: skip
    result = train(config_from_dict(d))
    assert "BLEU=" in capfd.readouterr().out
    assert len((result.workdir / "hypotheses.txt").read_text().splitlines()) == 8
    base = _flat(restore_model(tmp_path / "t5").model)
    tuned = _flat(restore_model(result.workdir).model)
    changed = _changed(base, tuned)
    assert changed and all(k.startswith(("encoder", "encoder_norm")) for k in changed)


def test_a_head_of_another_size_is_reinitialised_and_trains():
    from llm_jax.finetune.base import start_params

    base_cfg = ModelConfig.from_dict({**BERT, "vocab_size": 50, "num_labels": 3})
    base = jax.tree.map(lambda s: np.ones(s.shape, np.float32), _shapes(base_cfg))
    cfg = base_cfg.replace(num_labels=2, lora_rank=2)
    start = start_params(cfg, base, seed=0, base_cfg=base_cfg)
    assert start.reinitialised == ("classifier/bias", "classifier/kernel")
    assert "re-initialised (shape changed): classifier/bias" in "\n".join(start.report())
    part = partition_for(cfg, FinetuneConfig(method="lora"), start.params, start.fresh)
    assert part.parts["classifier/kernel"] is True and part.parts["pooler/kernel"] is False
    with pytest.raises(ValueError, match="changed its size"):
        start_params(base_cfg.replace(d_ff=32), base, seed=0, base_cfg=base_cfg)
