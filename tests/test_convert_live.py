"""The checks of tests/test_convert.py, live against PyTorch transformers (the `hf` extra).

Fresh random models (another seed than the committed fixtures) are built with
tests/fixtures/make_hf_fixtures.py; ours must give the same logits and the same greedy and
4-beam generations; our export must load in transformers' `from_pretrained` and run to the
same logits, and transformers' `save_pretrained` of it must load back into identical
parameters. Skipped when torch or transformers is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import llm_jax.convert as convert  # noqa: E402
from llm_jax.convert.hf_weights import flatten_tree  # noqa: E402
from tests.fixtures import hf_checks as checks  # noqa: E402
from tests.fixtures import make_hf_fixtures as make  # noqa: E402

ALL = make.FIXTURES
GENERATIVE = make.GENERATIVE
SEED = 1


@pytest.fixture(scope="module")
def live(tmp_path_factory, corpora):
    """Fresh fixtures (seed 1) written by transformers into a temporary folder."""
    out = tmp_path_factory.mktemp("hf_live")
    text = (corpora / "shakespeare.txt").read_text()[: make.TEXT_BYTES]
    return {name: make.build_fixture(name, out, seed=SEED, text=text) for name in ALL}


@pytest.fixture(scope="module")
def ours(live):
    return {name: convert.load_hf(path) for name, path in live.items()}


@pytest.mark.parametrize("name", ALL)
def test_live_outputs_match(live, ours, name):
    info, expected = checks.read_expected(live[name])
    errors = checks.max_errors(checks.our_outputs(ours[name], name, info), expected, info)
    print(f"{name} (live, transformers {transformers.__version__}): max error {errors}")
    assert max(errors.values()) < checks.LOGIT_TOL, errors


@pytest.mark.parametrize("name", GENERATIVE)
def test_live_generate_matches(live, ours, name):
    info, _ = checks.read_expected(live[name])
    worst = checks.compare_generations(
        checks.our_generations(ours[name], info["generate"]), info["generate"]
    )
    print(f"{name} (live): greedy and 4-beam tokens identical; max beam-score diff {worst:.2e}")


@pytest.mark.parametrize("name", ALL)
def test_export_runs_in_transformers_and_round_trips(live, ours, name, tmp_path):
    """save_hf -> from_pretrained: same outputs and generations; save_pretrained -> load_hf:
    identical parameters."""
    model = ours[name]
    exported = convert.save_hf(model, tmp_path / "exported")
    arch = convert.read_hf_config(exported)["architectures"][0]
    hf_model = getattr(transformers, arch).from_pretrained(exported).eval()
    info, hf_outputs = make.reference_outputs(hf_model, name, seed=SEED)
    errors = checks.max_errors(checks.our_outputs(model, name, info), hf_outputs, info)
    print(f"{name}: transformers on our export, max error {errors}")
    assert max(errors.values()) < checks.LOGIT_TOL, errors
    if "generate" in info:
        checks.compare_generations(
            checks.our_generations(model, info["generate"]), info["generate"]
        )
    hf_model.save_pretrained(tmp_path / "resaved")
    cfg, params = convert.load_hf_params(tmp_path / "resaved")
    assert cfg == model.cfg
    mine = flatten_tree(convert.params_of(model))
    theirs = flatten_tree(params)
    assert sorted(mine) == sorted(theirs)
    for key in mine:
        np.testing.assert_array_equal(np.asarray(mine[key]), theirs[key], err_msg=key)


@pytest.mark.parametrize("name", ("gpt2", "llama", "t5"))
def test_exported_tokenizers_load_in_transformers(live, ours, name, tmp_path):
    tok = convert.load_hf_tokenizer(live[name])
    out = convert.save_hf(ours[name], tmp_path / name, tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in make.TOKENIZER_STRINGS:
        assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text), text
    assert hf_tok.eos_token_id == tok.eos_id


VARIANTS = {
    "llama_biases_wide_heads": lambda tf: tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            attention_bias=True,
            mlp_bias=True,
            initializer_range=0.3,
        )
    ),
    # LLaMA 3.1/3.2 RoPE rescaling; head_dim 16 with a 64-token "pretraining context" puts
    # frequencies in all three of its regimes.
    "llama3_rope_scaling": lambda tf: tf.LlamaForCausalLM(
        tf.LlamaConfig(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10_000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=True,
            initializer_range=0.3,
        )
    ),
    "gpt2_relu_unscaled": lambda tf: tf.GPT2LMHeadModel(
        tf.GPT2Config(
            vocab_size=96,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_inner=48,
            n_positions=32,
            activation_function="relu",
            scale_attn_weights=False,
            tie_word_embeddings=False,
            initializer_range=0.3,
        )
    ),
    "bert_model_gelu_new": lambda tf: tf.BertModel(
        tf.BertConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            hidden_act="gelu_new",
            type_vocab_size=3,
            initializer_range=0.3,
        )
    ),
    "t5_gated_silu_asymmetric": lambda tf: tf.T5ForConditionalGeneration(
        tf.T5Config(
            vocab_size=96,
            d_model=32,
            d_kv=16,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=1,
            num_heads=4,
            feed_forward_proj="gated-silu",
        )
    ),
}


def _variant_outputs(variant: str, hf_model, model, ids: np.ndarray):
    """(theirs [float64], ours) on `ids`: logits, or BERT's last hidden states."""
    with torch.no_grad():
        if variant.startswith("t5"):
            dec = ids[:, :4]
            want = hf_model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(dec))
            return want.logits.double().numpy(), model(ids, dec)
        if variant.startswith("bert"):
            types = np.minimum(np.arange(7) // 3, 2)[None].repeat(2, 0)
            want = hf_model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types))
            return want.last_hidden_state.double().numpy(), model.encode(ids, token_type_ids=types)
        return hf_model(input_ids=torch.tensor(ids)).logits.double().numpy(), model(ids)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_transformers(variant, tmp_path):
    """Less common config fields: GQA with one kv head, head_dim != d_model / heads, biases,
    LLaMA 3 RoPE rescaling, ReLU / unscaled attention / untied GPT-2, a bare BertModel, gated
    SiLU and unequal encoder/decoder depths in T5. Our export loads back into transformers
    with the same outputs."""
    torch.manual_seed(0)
    hf_model = VARIANTS[variant](transformers).eval()
    hf_model.save_pretrained(tmp_path)
    model = convert.load_hf(tmp_path)
    ids = np.random.default_rng(0).integers(0, 96, (2, 7))
    # float64: the exact values, as in the fixtures.
    want, got = _variant_outputs(variant, hf_model.double(), model, ids)
    error = float(np.abs(np.asarray(got) - want).max())
    print(f"{variant}: max error {error:.2e}")
    assert error < checks.LOGIT_TOL
    exported = convert.save_hf(model, tmp_path / "exported")
    cls = type(hf_model)
    assert convert.read_hf_config(exported)["architectures"][0] == cls.__name__
    reloaded = cls.from_pretrained(exported).eval().double()
    np.testing.assert_allclose(_variant_outputs(variant, reloaded, model, ids)[0], want, atol=1e-9)


def test_bare_llama_model_loads_with_exact_hidden_states(tmp_path):
    """A headless `LlamaModel` has no lm_head: it loads tied, with exact hidden states."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
    )
    hf_model = transformers.LlamaModel(config).eval()
    hf_model.save_pretrained(tmp_path)
    model = convert.load_hf(tmp_path)
    assert model.cfg.tie_embeddings
    ids = np.random.default_rng(0).integers(0, 96, (2, 7))
    with torch.no_grad():
        want = hf_model.double()(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
    error = float(np.abs(np.asarray(model.features(ids)[0]) - want).max())
    assert error < checks.LOGIT_TOL, error
