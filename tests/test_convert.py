"""Hugging Face import/export against committed PyTorch reference outputs (no torch needed).

The fixtures in tests/fixtures/hf/ were written by tests/fixtures/make_hf_fixtures.py with
transformers: tiny random GPT-2, LLaMA (untied and tied), BERT (pretraining heads and a
classifier) and T5 (v1.0 tied + scaled, v1.1 gated-GELU untied) models, their logits and
their greedy / 4-beam `generate` outputs. tests/test_convert_live.py repeats the checks
against live transformers models when the `hf` extra is installed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import llm_jax.convert as convert
from llm_jax.checkpoint import CheckpointManager
from llm_jax.convert.hf_config import config_from_hf, config_to_hf
from llm_jax.convert.hf_weights import HFCheckpointError, flatten_tree
from llm_jax.models.config import ModelConfig
from tests.fixtures import hf_checks as checks
from tests.fixtures import make_hf_fixtures as make

HF = make.DEFAULT_OUT
ALL = make.FIXTURES
GENERATIVE = make.GENERATIVE


@pytest.fixture(scope="module")
def models():
    """Each fixture loaded once."""
    return {name: convert.load_hf(HF / name) for name in ALL}


def _copy_fixture(name: str, tmp_path: Path) -> Path:
    out = tmp_path / name
    shutil.copytree(HF / name, out)
    return out


def _rewrite(directory: Path, fn) -> None:
    weights = load_file(str(directory / "model.safetensors"))
    save_file(fn(dict(weights)), str(directory / "model.safetensors"), metadata={"format": "pt"})


def _params_equal(a, b) -> None:
    fa, fb = flatten_tree(a), flatten_tree(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


# --- numerics against the committed PyTorch outputs ------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_outputs_match_transformers(models, name):
    info, expected = checks.read_expected(HF / name)
    errors = checks.max_errors(checks.our_outputs(models[name], name, info), expected, info)
    print(f"{name}: max |ours - transformers| = {errors}")
    assert max(errors.values()) < checks.LOGIT_TOL, errors


@pytest.mark.parametrize("name", GENERATIVE)
def test_greedy_and_beam_match_transformers_generate(models, name):
    info, _ = checks.read_expected(HF / name)
    ours = checks.our_generations(models[name], info["generate"])
    worst = checks.compare_generations(ours, info["generate"])
    print(f"{name}: greedy and 4-beam tokens identical; max beam-score diff {worst:.2e}")


def test_loaded_configs():
    cfgs = {name: convert.load_hf_params(HF / name)[0] for name in ALL}
    assert cfgs["gpt2"].family == "gpt" and cfgs["gpt2"].position == "learned"
    assert cfgs["gpt2"].tie_embeddings
    llama = cfgs["llama"]
    assert (llama.position, llama.rope_theta, llama.num_kv_heads, llama.gated_mlp) == (
        "rope",
        5000.0,
        2,
        True,
    )
    assert not llama.tie_embeddings and cfgs["llama_tied"].tie_embeddings
    bert = cfgs["bert"]
    assert bert.use_pooler and bert.use_mlm_head and bert.use_nsp and bert.num_labels == 0
    cls = cfgs["bert_cls"]
    assert cls.use_pooler and not cls.use_mlm_head and cls.num_labels == 3
    assert cfgs["t5"].tie_embeddings and cfgs["t5"].scale_tied_logits
    assert cfgs["t5"].activation == "relu" and not cfgs["t5"].gated_mlp
    v11 = cfgs["t5_v11"]
    assert not v11.tie_embeddings and not v11.scale_tied_logits
    assert v11.gated_mlp and v11.activation == "gelu_tanh"


# --- export and round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_save_hf_writes_the_original_tensors_and_round_trips(models, name, tmp_path):
    """save_hf(load_hf(x)) holds exactly x's tensors (tied copies aside) and reloads equal."""
    out = convert.save_hf(models[name], tmp_path / "out")
    original = load_file(str(HF / name / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    cfg, params = convert.load_hf_params(out)
    assert cfg == models[name].cfg
    _params_equal(params, convert.params_of(models[name]))
    # The exported config reads back the same whatever the tensors say.
    exported = json.loads((out / "config.json").read_text())
    assert config_from_hf(exported) == cfg


def test_config_to_hf_keeps_the_original_fields():
    # Special ids come from the tokenizer or `spec`; an untied T5 head is written with 4.x's
    # tie_word_embeddings=false where 5.x wrote true (both versions read ours the same).
    skip = {"eos_token_id", "bos_token_id", "pad_token_id", "tie_word_embeddings"}
    for name in ALL:
        original = json.loads((HF / name / "config.json").read_text())
        cfg = convert.load_hf_params(HF / name)[0]
        exported = config_to_hf(cfg)
        for key, value in exported.items():
            if key in original and not ((key in skip and name.startswith("t5")) or "token" in key):
                assert original[key] == value or (
                    isinstance(value, float) and np.isclose(original[key], value)
                ), (name, key, original[key], value)


def test_t5_tied_unscaled_head_is_exported_untied(tmp_path):
    cfg = ModelConfig.preset("t5-tiny", scale_tied_logits=False)
    model = convert.model_from_params(cfg, _random_params(cfg))
    out = convert.save_hf(model, tmp_path)
    hf = json.loads((out / "config.json").read_text())
    assert hf["tie_word_embeddings"] is False and hf["scale_decoder_outputs"] is False
    weights = load_file(str(out / "model.safetensors"))
    np.testing.assert_array_equal(weights["lm_head.weight"], weights["shared.weight"])
    cfg2, params = convert.load_hf_params(out)
    assert cfg2.tie_embeddings and not cfg2.scale_tied_logits
    _params_equal(params, convert.params_of(model))


def _random_params(cfg: ModelConfig):
    from flax import nnx

    from llm_jax.models import build

    model = build(cfg, rngs=nnx.Rngs(0))
    return jax.tree.map(np.asarray, convert.params_of(model))


# --- the key variants transformers accepts --------------------------------------------------------


def test_gpt2_keys_without_prefix_and_with_buffers(models, tmp_path):
    d = _copy_fixture("gpt2", tmp_path)

    def strip(w):
        out = {k.removeprefix("transformer."): v for k, v in w.items()}
        out["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old mask buffer
        out["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
        out["lm_head.weight"] = w["transformer.wte.weight"]  # a stored tied copy
        return out

    _rewrite(d, strip)
    _params_equal(convert.load_hf_params(d)[1], convert.params_of(models["gpt2"]))


def test_bert_without_prefix_and_legacy_gamma_beta(models, tmp_path):
    d = _copy_fixture("bert", tmp_path)

    def legacy(w):
        out = {}
        for k, v in w.items():
            k = k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
            out[k.replace("LayerNorm.bias", "LayerNorm.beta")] = v
        out["embeddings.position_ids"] = np.arange(64)[None]
        out["cls.predictions.decoder.weight"] = w["bert.embeddings.word_embeddings.weight"]
        out["cls.predictions.decoder.bias"] = w["cls.predictions.bias"]
        return out

    _rewrite(d, legacy)
    _params_equal(convert.load_hf_params(d)[1], convert.params_of(models["bert"]))


def test_bert_heads_follow_the_tensors(tmp_path):
    """A BertForMaskedLM config over pretraining weights keeps every head (as for
    bert-base-uncased); a BertModel checkpoint without heads loads as an encoder."""
    d = _copy_fixture("bert", tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (d / "config.json").write_text(json.dumps(config))
    cfg = convert.load_hf_params(d)[0]
    assert cfg.use_mlm_head and cfg.use_nsp and cfg.use_pooler
    config["architectures"] = ["BertModel"]
    (d / "config.json").write_text(json.dumps(config))
    _rewrite(
        d,
        lambda w: {
            k: v
            for k, v in w.items()
            if k.startswith("bert.encoder") or k.startswith("bert.embeddings")
        },
    )
    cfg = convert.load_hf_params(d)[0]
    assert not (cfg.use_mlm_head or cfg.use_nsp or cfg.use_pooler or cfg.num_labels)
    assert convert.save_hf(convert.load_hf(d), tmp_path / "out").is_dir()
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["architectures"] == ["BertModel"]


def test_sharded_checkpoint(models, tmp_path):
    d = _copy_fixture("llama", tmp_path)
    weights = load_file(str(d / "model.safetensors"))
    keys = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": keys[:7],
        "model-00002-of-00002.safetensors": keys[7:],
    }
    for shard, names in shards.items():
        save_file({k: weights[k] for k in names}, str(d / shard), metadata={"format": "pt"})
    (d / "model.safetensors").unlink()
    index = {"weight_map": {k: s for s, names in shards.items() for k in names}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _params_equal(convert.load_hf_params(d)[1], convert.params_of(models["llama"]))


@pytest.mark.parametrize("dtype, eps", [("bfloat16", 2**-7), ("float16", 2**-10)])  # machine eps
def test_bfloat16_and_float16_weights_load(dtype, eps, tmp_path):
    import ml_dtypes

    half = getattr(ml_dtypes, dtype) if dtype == "bfloat16" else np.float16
    d = _copy_fixture("t5", tmp_path)
    _rewrite(d, lambda w: {k: v.astype(half) for k, v in w.items()})
    params = flatten_tree(convert.load_hf_params(d)[1])
    original = flatten_tree(convert.load_hf_params(HF / "t5")[1])
    assert sorted(params) == sorted(original)
    for key, value in params.items():
        assert value.dtype == np.float32, key
        # Each weight is the fp32 original rounded once to `dtype`: relative error <= eps/2
        # (atol covers float16's subnormals).
        np.testing.assert_allclose(value, original[key], rtol=eps / 2, atol=2**-24, err_msg=key)


# --- errors that name the problem -----------------------------------------------------------------


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
    d = _copy_fixture("gpt2", tmp_path)

    def break_it(w):
        del w["transformer.h.1.mlp.c_fc.weight"]
        w["transformer.h.0.attn.c_proj.weight"] = w["transformer.h.0.attn.c_proj.weight"][:, :16]
        w["transformer.h.0.extra.weight"] = np.zeros(3, np.float32)
        return w

    _rewrite(d, break_it)
    with pytest.raises(HFCheckpointError) as e:
        convert.load_hf(d)
    msg = str(e.value)
    assert "missing keys" in msg and "h.1.mlp.c_fc.weight" in msg
    assert "unexpected keys" in msg and "transformer.h.0.extra.weight" in msg
    assert "shape mismatches" in msg and "transformer.h.0.attn.c_proj.weight (32, 16)" in msg


def test_untied_head_under_a_tied_config_is_an_error(tmp_path):
    d = _copy_fixture("gpt2", tmp_path)
    _rewrite(d, lambda w: {**w, "lm_head.weight": w["transformer.wte.weight"] + 1.0})
    with pytest.raises(convert.UnsupportedConfigError, match="tie_word_embeddings"):
        convert.load_hf(d)


def test_t5_untied_head_in_a_4x_tied_config_is_an_error(tmp_path):
    d = _copy_fixture("t5_v11", tmp_path)
    config = json.loads((d / "config.json").read_text())
    del config["scale_decoder_outputs"]  # 4.x reading: tie_word_embeddings=true means tied
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(convert.UnsupportedConfigError, match=r"lm_head\.weight"):
        convert.load_hf(d)


def test_no_safetensors_and_pickle_only_folders(tmp_path):
    (tmp_path / "config.json").write_text((HF / "gpt2" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        convert.load_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle"):
        convert.load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        convert.load_hf(tmp_path / "nowhere")


def _config(name: str, **changes) -> dict:
    config = json.loads((HF / name / "config.json").read_text())
    config.update(changes)
    return config


@pytest.mark.parametrize(
    "name, changes, match",
    [
        ("gpt2", {"architectures": ["GPT2ForTokenClassification"]}, "not supported"),
        ("gpt2", {"architectures": None, "model_type": "mistral"}, "not supported"),
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("gpt2", {"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ("gpt2", {"activation_function": "quick_gelu"}, "activation_function"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
            r"needs \['low_freq_factor', 'high_freq_factor'\]",
        ),
        (
            "llama",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5}},
            "'yarn' is not implemented",
        ),
        (
            "llama",
            {"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}},
            "rope_scaling",
        ),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("bert", {"is_decoder": True}, "is_decoder"),
        ("bert", {"tie_word_embeddings": False}, "tie_word_embeddings"),
        ("t5", {"feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj"),
        ("t5", {"feed_forward_proj": "mish"}, "feed_forward_proj"),
    ],
)
def test_config_fields_we_cannot_honour_are_errors(name, changes, match):
    with pytest.raises(convert.UnsupportedConfigError, match=match):
        config_from_hf(_config(name, **changes))


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def test_llama3_rope_scaling_read_from_4x_and_5x_configs_and_written_back():
    llama5 = _config("llama", rope_parameters={**LLAMA3_ROPE, "rope_theta": 5e5})
    llama4 = {k: v for k, v in llama5.items() if k != "rope_parameters"}
    llama4.update(rope_theta=5e5, rope_scaling=LLAMA3_ROPE)
    cfg = config_from_hf(llama5)
    assert config_from_hf(llama4) == cfg
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor) == ("llama3", 5e5, 32.0)
    assert (cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == (1.0, 4.0)
    assert cfg.rope_original_max_position == 8192
    # Without original_max_position_embeddings, transformers uses max_position_embeddings.
    short = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
    fallback = config_from_hf(_config("llama", rope_parameters={**short, "rope_theta": 5e5}))
    assert fallback.rope_original_max_position == llama5["max_position_embeddings"]
    written = convert.config_to_hf(cfg)
    assert written["rope_parameters"] == {**LLAMA3_ROPE, "rope_theta": 5e5}
    assert written["rope_scaling"] == LLAMA3_ROPE
    assert config_from_hf(written) == cfg


def test_t5_untied_scaled_head_is_an_error():
    weights = {k: v for k, v in load_file(str(HF / "t5_v11" / "model.safetensors")).items()}
    config = _config("t5_v11", scale_decoder_outputs=True)
    with pytest.raises(convert.UnsupportedConfigError, match="scale_decoder_outputs"):
        config_from_hf(config, weights)


def test_transformers_4x_and_5x_configs_read_the_same():
    llama5 = _config("llama")
    llama4 = {k: v for k, v in llama5.items() if k != "rope_parameters"}
    llama4["rope_theta"] = llama5["rope_parameters"]["rope_theta"]
    llama4["rope_scaling"] = None
    assert config_from_hf(llama4) == config_from_hf(llama5)
    # T5 v1.1: 4.x writes tie_word_embeddings=false; 5.x true + scale_decoder_outputs=false.
    weights = load_file(str(HF / "t5_v11" / "model.safetensors"))
    t5_5 = _config("t5_v11")
    t5_4 = {k: v for k, v in t5_5.items() if k != "scale_decoder_outputs"}
    t5_4["tie_word_embeddings"] = False
    assert config_from_hf(t5_4, weights) == config_from_hf(t5_5, weights)
    assert config_from_hf(t5_4) == config_from_hf(t5_5, weights)
    # T5 v1.0: 4.x tie_word_embeddings=true (scaled) == 5.x scale_decoder_outputs=true.
    t5v10 = {k: v for k, v in _config("t5").items() if k != "scale_decoder_outputs"}
    assert config_from_hf(t5v10) == config_from_hf(_config("t5"))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(preset="transformer-base"), "relative"),
        (dict(preset="bert-tiny", embedding_dim=32), "ALBERT"),
        (dict(preset="bert-tiny", use_nsp=False), "BERT class"),
        (dict(preset="gpt2-tiny", num_kv_heads=2), "grouped-query"),
        (dict(preset="gpt2-tiny", norm="rmsnorm"), "norm"),
        (dict(preset="t5-tiny", gated_mlp=True, activation="gelu"), "gated exact GELU"),
    ],
)
def test_exporting_what_transformers_cannot_express_is_an_error(changes, match):
    cfg = ModelConfig.from_dict(changes)
    with pytest.raises(convert.UnsupportedConfigError, match=match):
        config_to_hf(cfg)


# --- tokenizers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kind",
    [
        ("gpt2", "HFTokenizer"),
        ("llama", "SentencePieceTokenizer"),
        ("t5", "SentencePieceTokenizer"),
    ],
)
def test_tokenizers_match_transformers(name, kind, tmp_path):
    tok = convert.load_hf_tokenizer(HF / name)
    assert type(tok).__name__ == kind
    info, _ = checks.read_expected(HF / name)
    for case in info["tokenizer"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"]
        if kind == "HFTokenizer":
            assert tok.encode(case["text"], add_special_tokens=True) == case["ids_with_special"]
    # Our saved form (a checkpoint's tokenizer/) reads back the same.
    again = convert.load_hf_tokenizer(tok.save(tmp_path / "ours"))
    assert type(again) is type(tok) and again.special_ids == tok.special_ids
    assert again.encode(info["tokenizer"][0]["text"]) == info["tokenizer"][0]["ids"]


def test_tokenizer_special_ids_and_t5_sentinels():
    gpt2 = convert.load_hf_tokenizer(HF / "gpt2")
    assert gpt2.special_ids == {"unk": 0, "bos": 1, "eos": 2, "pad": 3}
    assert gpt2.vocab_size == 128 and gpt2.decode([1, 2], skip_special_tokens=True) == ""
    t5 = convert.load_hf_tokenizer(HF / "t5")
    assert (t5.pad_id, t5.eos_id, t5.unk_id) == (0, 1, 2)
    assert t5.vocab_size == 128 and t5.num_sentinels == 28 and t5.sentinel_id(0) == 127
    assert t5.decode([t5.sentinel_id(1)]) == "<extra_id_1>"
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        convert.load_hf_tokenizer(HF / "bert")


def test_save_hf_with_tokenizer(models, tmp_path):
    out = convert.save_hf(models["gpt2"], tmp_path / "gpt2", tokenizer=HF / "gpt2")
    assert (out / "tokenizer.json").read_text() == (HF / "gpt2" / "tokenizer.json").read_text()
    tok = convert.load_hf_tokenizer(HF / "gpt2")
    out = convert.save_hf(models["gpt2"], tmp_path / "from_object", tokenizer=tok)
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert convert.load_hf_tokenizer(out).encode("hello") == tok.encode("hello")
    t5 = convert.save_hf(
        models["t5"], tmp_path / "t5", tokenizer=convert.load_hf_tokenizer(HF / "t5")
    )
    assert (t5 / "spiece.model").read_bytes() == (HF / "t5" / "spiece.model").read_bytes()
    assert json.loads((t5 / "tokenizer_config.json").read_text())["extra_ids"] == 28


# --- our checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip_with_tokenizer(models, tmp_path):
    tok = convert.load_hf_tokenizer(HF / "gpt2")
    step = convert.save_checkpoint(models["gpt2"], tmp_path / "ckpt", tokenizer=tok)
    assert step == tmp_path / "ckpt" / "0"
    for where in (tmp_path / "ckpt", step):
        loaded = convert.restore_model(where)
        assert loaded.step == 0 and loaded.model.cfg == models["gpt2"].cfg
        _params_equal(convert.params_of(loaded.model), convert.params_of(models["gpt2"]))
        again = convert.load_hf_tokenizer(loaded.ref.tokenizer_dir())
        assert again.encode("First Citizen") == tok.encode("First Citizen")
    with pytest.raises(ValueError, match="step 0"):
        convert.save_checkpoint(models["gpt2"], tmp_path / "ckpt")


def test_load_checkpoint_reads_training_checkpoints(tmp_path):
    """A training run's workdir: state is a TrainState with an optimizer state."""
    import optax

    from llm_jax.train.step import TrainState

    cfg = ModelConfig.preset("llama-tiny", num_layers=1)
    params = _random_params(cfg)
    opt_state = optax.adam(1e-3).init(params)
    state = TrainState(
        step=np.int32(7), params=params, opt_state=opt_state, rng=np.zeros(2, np.uint32)
    )
    config = {"model": cfg.to_dict(), "train": {"steps": 7}}
    with CheckpointManager(tmp_path / "run" / "checkpoints", async_save=False) as mngr:
        mngr.save(7, state, config=config, force=True)
    loaded = convert.restore_model(tmp_path / "run")
    assert loaded.step == 7 and loaded.config["train"] == {"steps": 7}
    _params_equal(convert.params_of(loaded.model), params)
    model = convert.load_checkpoint(tmp_path / "run" / "checkpoints" / "7", dropout_rate=0.0)
    _params_equal(convert.params_of(model), params)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        convert.load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no verified checkpoint"):
        convert.load_checkpoint(tmp_path / "empty")


def test_cli_round_trip_hf_checkpoint_hf(tmp_path, capsys):
    from llm_jax.cli import main

    assert main(["convert", "--from-hf", str(HF / "t5"), "--to", str(tmp_path / "ckpt")]) == 0
    assert '"family": "t5"' in capsys.readouterr().out
    args = ["convert", "--from-checkpoint", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf")]
    assert main(args) == 0
    original = load_file(str(HF / "t5" / "model.safetensors"))
    written = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(original) == sorted(written)
    for key in original:
        np.testing.assert_array_equal(written[key], original[key])
    assert (tmp_path / "hf" / "spiece.model").is_file()
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["decoder_start_token_id"]) == (
        1,
        0,
        0,
    )
    assert main(["convert", "--from-hf", str(HF / "t5")]) == 2
    assert "exactly one destination" in capsys.readouterr().err
