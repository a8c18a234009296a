"""Prompt tuning (llm_jax.finetune.prompt): the soft prompt through inputs_embeds.

The exactness checks set the P prompt rows to the embeddings of P real tokens: the
prompt-tuned model must then give the base model's outputs on the concatenated tokens.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llm_jax.sample as sample
from llm_jax.finetune import (
    PromptTuned,
    PromptTunedBERT,
    PromptTunedGPT,
    PromptTunedT5,
    check_prompt_fits,
    init_model_prompt,
    init_prompt,
    prompt_tuned_class,
)
from llm_jax.finetune.prompt import VOCAB_SAMPLE
from llm_jax.models import BERT, GPT, T5, ModelConfig, build
from llm_jax.parallel import RULES, MeshConfig, logical_axes, logical_to_sharding, make_mesh
from llm_jax.sample.adapters import as_decoder
from llm_jax.train.losses import (
    LossConfig,
    classification_losses,
    clm_losses,
    seq2seq_losses,
)

P = 3
PROMPT_TOKENS = jnp.array([11, 12, 13])
TINY = {
    "gpt2": ModelConfig.preset("gpt2-tiny"),
    "llama": ModelConfig.preset("llama-tiny"),
    "bert": ModelConfig.preset("bert-tiny", num_labels=3),
    "albert": ModelConfig.preset("bert-tiny", embedding_dim=32, share_layers=True),
    "t5": ModelConfig.preset("t5-tiny"),
}
CLASSES = {"gpt": GPT, "bert": BERT, "t5": T5}
RTOL, ATOL = 1e-5, 1e-6


def tokens(shape=(2, 8), seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 7, 500)


def prompted(name: str, p: int = P) -> tuple[PromptTuned, nnx.Module]:
    """A prompt-tuned model whose prompt rows are the embeddings of PROMPT_TOKENS[:p], and
    its base model (prompt_length 0) holding the same base parameters, copied by path."""
    cfg = TINY[name].replace(prompt_length=p)
    model = build(cfg, rngs=nnx.Rngs(0))
    model.prompt[...] = model.embed.embedding[...][PROMPT_TOKENS[:p]]
    base = build(cfg.replace(prompt_length=0), rngs=nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(model))
    params.pop("prompt")
    nnx.update(base, params)
    return model, base


def rows(ids, b=2):
    return jnp.broadcast_to(ids, (b, ids.shape[0]))


def close(actual, desired):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=RTOL, atol=ATOL)


# Parameter tree -------------------------------------------------------------------------------


def tree(model) -> dict:
    """{path: (shape, logical axes)} of every parameter."""
    return {
        "/".join(map(str, path)): (tuple(v.get_value().shape), v.get_metadata()["out_sharding"])
        for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "albert", "t5"])
def test_param_tree_is_the_base_tree_plus_prompt(name):
    cfg = TINY[name]
    today = tree(nnx.eval_shape(lambda: CLASSES[cfg.family](cfg, rngs=nnx.Rngs(0))))
    plain = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    assert type(plain) is CLASSES[cfg.family] and tree(plain) == today
    tuned = nnx.eval_shape(lambda: build(cfg.replace(prompt_length=5), rngs=nnx.Rngs(0)))
    assert isinstance(tuned, PromptTuned) and isinstance(tuned, CLASSES[cfg.family])
    assert tree(tuned) == {**today, "prompt": ((5, cfg.embed_dim), (None, "embed"))}


def test_base_parameters_keep_their_values():
    """The prompt is drawn after every base parameter: same seed, same base weights."""
    cfg = TINY["gpt2"]
    tuned = nnx.to_pure_dict(nnx.state(build(cfg.replace(prompt_length=P), rngs=nnx.Rngs(0))))
    assert tuned.pop("prompt").shape == (P, 64)
    plain = nnx.to_pure_dict(nnx.state(build(cfg, rngs=nnx.Rngs(0))))
    jax.tree.map(np.testing.assert_array_equal, tuned, plain)


# Exactness: prompt rows = embeddings of real tokens ------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gpt_prompt_equals_prepended_tokens(name):
    model, base = prompted(name)
    toks = tokens()
    want = base(jnp.concatenate([rows(PROMPT_TOKENS), toks], axis=1))[:, P:]
    close(model(toks), want)
    # Explicit positions and segment ids (one document per row) give the same.
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    close(model(toks, positions=positions, segment_ids=jnp.ones_like(toks)), want)


def test_bert_prompt_after_cls_equals_inserted_tokens():
    model, base = prompted("bert")
    toks = tokens()
    types = jnp.array([[0] * 4 + [1] * 4] * 2)
    segments = jnp.array([[1] * 8, [1] * 6 + [0] * 2])
    kw = dict(token_type_ids=types, segment_ids=segments)

    def insert(x, fill):
        return jnp.concatenate([x[:, :1], fill, x[:, 1:]], axis=1)

    base_kw = dict(
        token_type_ids=insert(types, jnp.zeros((2, P), types.dtype)),
        segment_ids=insert(segments, jnp.ones((2, P), segments.dtype)),
    )
    full = insert(toks, rows(PROMPT_TOKENS))
    close(model.classify(toks, **kw), base.classify(full, **base_kw))
    mlm, nsp = model.pretraining_logits(toks, **kw)
    base_mlm, base_nsp = base.pretraining_logits(full, **base_kw)
    close(mlm, jnp.concatenate([base_mlm[:, :1], base_mlm[:, 1 + P :]], axis=1))
    close(nsp, base_nsp)


def test_albert_prompt_has_the_embedding_width():
    model, base = prompted("albert")
    toks = tokens()
    full = jnp.concatenate([toks[:, :1], rows(PROMPT_TOKENS), toks[:, 1:]], axis=1)
    want = base(full)
    close(model(toks), jnp.concatenate([want[:, :1], want[:, 1 + P :]], axis=1))


def test_t5_encoder_prompt_equals_prepended_tokens():
    model, base = prompted("t5")
    enc, dec = tokens(), tokens((2, 5), seed=1)
    segments = jnp.array([[1] * 8, [1] * 6 + [0] * 2])
    got = model(enc, dec, encoder_segment_ids=segments)
    want = base(
        jnp.concatenate([rows(PROMPT_TOKENS), enc], axis=1),
        dec,
        encoder_segment_ids=jnp.concatenate([jnp.ones((2, P), segments.dtype), segments], 1),
    )
    close(got, want)
    assert model.encode(enc).shape == (2, P + 8, 64)


# Training: the prompt gets a gradient ----------------------------------------------------------


def prompt_grad(model, loss_fn, batch):
    graphdef, params = nnx.split(model)

    def loss(params):
        losses = loss_fn(nnx.merge(graphdef, params), batch, None, LossConfig())
        total, count = next(iter(losses.values()))
        return total / count

    return nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))["prompt"]


def test_loss_gradients_reach_the_prompt():
    toks = tokens()
    gpt, _ = prompted("gpt2")
    batch = {"tokens": toks, "targets": tokens(seed=1), "weights": jnp.ones((2, 8))}
    bert, _ = prompted("bert")
    labels = {"tokens": toks, "labels": jnp.array([0, 2]), "label_weights": jnp.ones(2)}
    t5, _ = prompted("t5")
    pairs = {
        "encoder_tokens": toks,
        "decoder_tokens": tokens((2, 5), seed=2),
        "decoder_targets": tokens((2, 5), seed=3),
        "decoder_weights": jnp.ones((2, 5)),
    }
    for model, fn, b in [
        (gpt, clm_losses, batch),
        (bert, classification_losses, labels),
        (t5, seq2seq_losses, pairs),
    ]:
        grad = np.asarray(prompt_grad(model, fn, b))
        assert grad.shape == model.prompt[...].shape
        assert np.all(np.isfinite(grad)) and np.all(np.abs(grad).sum(axis=1) > 0), type(model)


def test_sharded_forward_equals_one_device():
    """The prompt's logical axes shard it like the embeddings (fsdp_tp on 8 CPU devices)."""
    model, _ = prompted("bert")
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
    shardings = logical_to_sharding(params, logical_axes(model), mesh, "fsdp_tp")
    assert tuple(shardings["prompt"].spec) == (None, RULES["fsdp_tp"]["embed"])
    sharded = jax.device_put(params, shardings)
    nnx.replace_by_pure_dict(state, sharded)
    forward = jax.jit(lambda s, toks: nnx.merge(graphdef, s).classify(toks))
    toks = tokens()
    np.testing.assert_allclose(forward(state, toks), model.classify(toks), rtol=1e-5, atol=1e-6)


# Generation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_gpt_greedy_decode_with_prompt_equals_full_forward(name):
    """Left-padded cached decoding (soft prompt in the cache, positions shifted by P) gives
    the argmax and log-probabilities of the uncached forward of the prompt-tuned model."""
    model, base = prompted(name)
    model.prompt[...] = 0.5 * jax.random.normal(jax.random.key(3), (P, 64))
    prompts = [[5, 17, 300, 2], [44], [9, 8, 7, 6, 5, 4, 3]]
    out = sample.generate(model, prompts, max_new_tokens=6, return_log_probs=True)
    width = 16
    seqs = [p + list(map(int, g)) for p, g in zip(prompts, out.tokens, strict=True)]
    batch = jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
    log_probs = jax.nn.log_softmax(model(batch), axis=-1)  # one uncached forward
    base_log_probs = jax.nn.log_softmax(base(batch), axis=-1)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        steps, new = np.arange(len(p) - 1, len(s) - 1), np.asarray(s[len(p) :])
        np.testing.assert_array_equal(np.argmax(log_probs[i, steps], -1), new)
        want = log_probs[i, steps, new]
        np.testing.assert_allclose(out.log_probs[i], want, rtol=1e-4, atol=1e-5)
        # The prompt matters: the base model scores the same tokens differently.
        assert np.max(np.abs(base_log_probs[i, steps, new] - want)) > 1e-2


def test_t5_greedy_decode_with_prompt_equals_full_forward():
    model, _ = prompted("t5")
    model.prompt[...] = jax.random.normal(jax.random.key(3), (P, 64))
    enc = [[5, 17, 300, 2, 9], [44]]
    out = sample.generate(model, enc, max_new_tokens=5)
    for src, gen in zip(enc, np.asarray(out.tokens), strict=True):
        dec = jnp.asarray([[0, *gen[:-1]]], jnp.int32)
        logits = model(jnp.asarray([src], jnp.int32), dec)
        np.testing.assert_array_equal(np.argmax(logits[0], -1), gen)


def test_decoder_limits_leave_room_for_the_prompt():
    cfg = TINY["gpt2"].replace(prompt_length=8)
    model = build(cfg, rngs=nnx.Rngs(0))
    assert as_decoder(model).info.max_length == 128 - 8
    cache = model.init_cache(2, 10)
    assert cache.max_length == 18 and int(cache.index) == 8
    assert bool(jnp.all(cache.valid[:, :8])) and not bool(jnp.any(cache.valid[:, 8:]))


# Bad input ------------------------------------------------------------------------------------


def test_sequence_too_long_for_the_positions_names_both_settings():
    model = build(TINY["gpt2"].replace(prompt_length=8), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, toks: nnx.merge(graphdef, params)(toks))
    with pytest.raises(ValueError, match=r"data.seq_len=125 .*finetune.prompt_length=8"):
        forward(params, jnp.zeros((1, 125), jnp.int32))  # raised while tracing
    check_prompt_fits(model.cfg, 120)
    with pytest.raises(ValueError, match="at most 120"):
        check_prompt_fits(model.cfg, 121)
    # RoPE and T5's relative buckets have no position table to outgrow.
    check_prompt_fits(TINY["llama"].replace(prompt_length=8), 10_000)
    check_prompt_fits(TINY["t5"].replace(prompt_length=8), 10_000)


def test_config_validates_prompt_length():
    with pytest.raises(ValueError, match="prompt_length=-1"):
        TINY["gpt2"].replace(prompt_length=-1)
    with pytest.raises(ValueError, match="no room for input tokens"):
        TINY["bert"].replace(prompt_length=128)
    old = {k: v for k, v in TINY["gpt2"].to_dict().items() if k != "prompt_length"}
    assert ModelConfig.from_dict(old).prompt_length == 0


def test_base_without_inputs_embeds_is_refused():
    class Bag(nnx.Module):
        def __call__(self, tokens):
            return tokens

    with pytest.raises(ValueError, match=r"inputs_embeds, which Bag cannot take.*finetune.method"):
        prompt_tuned_class(Bag)
    assert prompt_tuned_class(GPT) is PromptTunedGPT
    assert prompt_tuned_class(BERT) is PromptTunedBERT
    assert prompt_tuned_class(T5) is PromptTunedT5


# Initialisation --------------------------------------------------------------------------------


def table(v=6000, e=4):
    return np.arange(v * e, dtype=np.float32).reshape(v, e)


def row_ids(prompt):
    """The vocabulary ids of rows of `table()`."""
    return (prompt[:, 0] / 4).astype(int)


def test_vocab_init_samples_ordinary_rows_of_the_first_5000_ids():
    special = [0, 1, 2, 3]
    prompt = init_prompt(table(), 50, seed=0, exclude_ids=special)
    ids = row_ids(prompt)
    np.testing.assert_array_equal(prompt, table()[ids])
    assert ids.max() < VOCAB_SAMPLE and not set(ids) & set(special)
    assert len(set(ids)) == 50  # without replacement
    np.testing.assert_array_equal(prompt, init_prompt(table(), 50, seed=0, exclude_ids=special))
    assert not np.array_equal(prompt, init_prompt(table(), 50, seed=1, exclude_ids=special))
    small = init_prompt(table(v=6), 10, seed=0, exclude_ids=[0])  # fewer ids than P
    assert set(row_ids(small)) <= {1, 2, 3, 4, 5}


def test_label_init_uses_label_words_then_vocab():
    prompt = init_prompt(table(), 5, seed=0, method="labels", token_ids=[7, [8, 10]])
    np.testing.assert_array_equal(prompt[0], table()[7])
    np.testing.assert_array_equal(prompt[1], table()[[8, 10]].mean(axis=0))
    assert row_ids(prompt[2:]).max() < VOCAB_SAMPLE
    with pytest.raises(ValueError, match="raise prompt_length to at least 3"):
        init_prompt(table(), 2, seed=0, method="labels", token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="needs the class labels' token ids"):
        init_prompt(table(), 2, seed=0, method="labels")
    with pytest.raises(ValueError, match=r"\[0, 6000\)"):
        init_prompt(table(), 2, seed=0, method="labels", token_ids=[6000])


def test_random_init_and_bad_method():
    prompt = init_prompt(table(), 7, seed=0, method="random")
    assert prompt.shape == (7, 4) and prompt.dtype == np.float32
    assert np.all(np.abs(prompt) <= 0.5) and np.std(prompt) > 0.1
    with pytest.raises(ValueError, match="prompt_init='bag' is not one of"):
        init_prompt(table(), 7, seed=0, method="bag")


def test_init_model_prompt_reads_the_models_own_table():
    model = build(TINY["albert"].replace(prompt_length=4), rngs=nnx.Rngs(0))
    init_model_prompt(model, "labels", seed=0, token_ids=[5, 6])
    np.testing.assert_array_equal(model.prompt[...][:2], model.embed.embedding[...][5:7])
    with pytest.raises(ValueError, match="has no soft prompt"):
        init_model_prompt(build(TINY["gpt2"], rngs=nnx.Rngs(0)))
