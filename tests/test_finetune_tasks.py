"""Fine-tuning tasks beyond BERT: instruction data (loss on responses only, packed without
crossing examples), GPT sequence classification (last real token, HF import/export,
trained to 100% on a separable set), classification rows without [CLS]/[SEP], and T5
text-to-text classification from fastText files."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax import ops
from llm_jax.data import DataConfig, load_source, make_iterator, train_tokenizer
from llm_jax.data.objectives import classification, instruct, pair_row
from llm_jax.data.packing import pack, row_pieces
from llm_jax.data.tokenizer import SentencePieceTokenizer
from llm_jax.models import ModelConfig, build
from llm_jax.train.losses import LOSSES, LossConfig

REPO = Path(__file__).resolve().parents[1]
INSTRUCT = REPO / "tests" / "data" / "instruct-en-es.jsonl"


@pytest.fixture(scope="module")
def records():
    return instruct.read_jsonl([INSTRUCT])


@pytest.fixture(scope="module")
def tok(records):
    prompts, responses = records
    return train_tokenizer(texts=prompts + responses, model_type="bpe", vocab_size=800)


def _instruct_cfg(token_cache, **kw):
    base = dict(
        paths=(str(INSTRUCT),), format="jsonl", objective="instruct", seq_len=128,
        batch_size=4, cache_dir=token_cache,
    )  # fmt: skip
    return DataConfig(**{**base, **kw})


def _without(tok, *names):
    """The same vocabulary with some named specials removed (as in a GPT-2 tokenizer)."""
    return SentencePieceTokenizer(
        tok._model_bytes(),
        model_type=tok.model_type,
        special_ids={k: v for k, v in tok.special_ids.items() if k not in names},
        num_sentinels=tok.num_sentinels,
    )


# Instruction data ----------------------------------------------------------------------------


def test_instruct_batch_literal():
    # Example 0: prompt [10, 11], response [12]; example 1: prompt [20], response [21, 22].
    stream = np.array([10, 11, 12, 20, 21, 22], np.int32)
    pieces, start = instruct.instruct_pieces(
        np.array([0, 3]), np.array([3, 3]), np.array([2, 1]), 11, bos_id=2, eos_id=3
    )
    np.testing.assert_array_equal(start, [3, 2])
    src = instruct.InstructSource(stream, pieces, pack([pieces.size], [11]), 10, start)
    b = src.build(np.array([0, -1]), 0)
    np.testing.assert_array_equal(b["tokens"][0], [2, 10, 11, 12, 3, 2, 20, 21, 22, 3])
    np.testing.assert_array_equal(b["targets"][0], [10, 11, 12, 3, 2, 20, 21, 22, 3, 0])
    # Targets 12 and EOS of example 0, 21, 22 and EOS of example 1; never a prompt token,
    # the next example's BOS or padding.
    np.testing.assert_array_equal(b["weights"][0], [0, 0, 1, 1, 0, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    assert not b["weights"][1].any() and not b["segment_ids"][1].any()


def test_instruct_long_examples_are_cut_or_dropped_with_a_warning():
    # Rows of 8: example 0 (2 + 10 tokens) keeps its first 8 with no EOS; example 1's
    # prompt of 7 leaves no response token after BOS and is dropped; example 2 fits whole.
    with pytest.warns(UserWarning, match=r"1 of 3 .* first 8 .* 1 whose prompt alone fills"):
        pieces, start = instruct.instruct_pieces(
            np.array([0, 12, 20]), np.array([12, 8, 3]), np.array([2, 7, 1]), 8, 2, 3
        )
    np.testing.assert_array_equal(pieces.start, [0, 20])
    np.testing.assert_array_equal(pieces.length, [7, 3])
    np.testing.assert_array_equal(pieces.suffix, [-1, 3])
    np.testing.assert_array_equal(pieces.size, [8, 5])
    np.testing.assert_array_equal(start, [3, 2])


def test_instruct_weights_exactly_on_response_tokens(tok, records, token_cache):
    prompts, responses = records
    with pytest.warns(UserWarning, match="longer than seq_len"):
        src = load_source(_instruct_cfg(token_cache), tok)
    idx = np.arange(src.num_examples)
    b = src.build(idx, 0)
    pid, brow, seg = row_pieces(src.layout, idx)
    assert len(pid) == len(prompts)  # every example is one piece, none dropped
    whole = 0
    for p, r, s in zip(pid.tolist(), brow.tolist(), seg.tolist(), strict=True):
        prompt, response = tok.encode(prompts[p]), tok.encode(responses[p])
        full = [tok.bos_id, *prompt, *response, tok.eos_id]
        mine = b["segment_ids"][r] == s
        # The example's inputs, and its last target (the row's next column).
        tokens = b["tokens"][r][mine]
        expected = full[: len(tokens)]
        np.testing.assert_array_equal(tokens, expected)
        weighted = b["targets"][r][mine & (b["weights"][r] > 0)]
        if len(full) <= src.T + 1:
            whole += 1
            np.testing.assert_array_equal(weighted, [*response, tok.eos_id])
        else:  # cut: the response's first tokens only, no EOS
            n = src.T + 1 - 1 - len(prompt)
            np.testing.assert_array_equal(weighted, response[: len(weighted)])
            assert len(weighted) in (n, n - 1)
    assert 150 < whole < len(prompts)
    assert int(b["weights"].sum()) == int((b["weights"] > 0).sum())


def test_instruct_rows_never_attend_across_examples(tok, token_cache):
    """The packed forward of a row equals each example's forward on its own."""
    with pytest.warns(UserWarning):
        src = load_source(_instruct_cfg(token_cache, seq_len=127), tok)
    b = src.build(np.arange(src.num_examples), 0)
    row = int(np.argmax(b["segment_ids"].max(1)))
    seg = b["segment_ids"][row]
    assert seg.max() >= 2
    mask = np.asarray(ops.segment_mask(jnp.asarray(seg[None])))[0, 0]
    np.testing.assert_array_equal(mask, (seg[:, None] == seg[None, :]) & (seg[:, None] > 0))
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=tok.vocab_size)
    model = build(cfg, rngs=nnx.Rngs(0))
    packed = model(
        jnp.asarray(b["tokens"][row : row + 1]),
        segment_ids=jnp.asarray(seg[None]),
        positions=jnp.asarray(b["positions"][row : row + 1]),
    )[0]
    for s in range(1, seg.max() + 1):
        alone = model(jnp.asarray(b["tokens"][row][seg == s][None]))[0]
        np.testing.assert_allclose(packed[seg == s], alone, rtol=1e-4, atol=1e-5)


def test_instruct_batches_resume_bit_identical(tok, token_cache):
    cfg = _instruct_cfg(token_cache, validation_fraction=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        it = make_iterator(cfg, tok)
        for _ in range(3):
            next(it)
        state = it.get_state()
        expected = [next(it) for _ in range(3)]
        resumed = make_iterator(cfg, tok)
        resumed.set_state(state)
        got = [next(resumed) for _ in range(3)]
        val = load_source(cfg, tok, "validation")
    for e, g in zip(expected, got, strict=True):
        assert e.keys() == g.keys()
        for k in e:
            np.testing.assert_array_equal(e[k], g[k])
    # The validation split holds the other ~10% of the examples.
    assert 0 < len(val.pieces) < 0.2 * 250


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', r"x\.jsonl:2 has no 'response'"),
        (b'{"prompt": "a", "response": "b"}\n\n{"prompt": "\xff"}\n', r"x\.jsonl:3: byte 0xff"),
        (b"", r"x\.jsonl holds no prompt-response records"),
        (b"\n  \n", r"x\.jsonl holds no prompt-response records"),
        (b'{"prompt": "a", "response": "b"\n', r"x\.jsonl:1 is not valid JSON"),
        (b'["a", "b"]\n', r"x\.jsonl:1 holds a JSON list, not an object"),
        (b'{"prompt": "a", "response": 3}\n', r"x\.jsonl:1: 'response' is a JSON int"),
    ],
    ids=["missing-key", "not-utf8", "empty", "blank", "bad-json", "not-object", "not-string"],
)
def test_instruct_bad_input_names_the_file_and_line(tmp_path, tok, content, match):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    cfg = _instruct_cfg(str(tmp_path / "cache"), paths=(str(path),))
    with pytest.raises(ValueError, match=match):
        load_source(cfg, tok)


def test_instruct_needs_jsonl_and_the_committed_excerpt_is_the_script_output(tmp_path):
    with pytest.raises(ValueError, match=r"format='text' cannot feed objective='instruct'"):
        DataConfig(objective="instruct")
    out = tmp_path / "out.jsonl"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "make_instruct_data.py"), "--input",
         str(REPO / "tests" / "data" / "bible-en-es.tsv"), "--limit", "250", "--out", str(out)],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    assert out.read_bytes() == INSTRUCT.read_bytes()
    first = json.loads(INSTRUCT.read_text(encoding="utf-8").split("\n")[0])
    assert first["prompt"].startswith("Translate to Spanish: In the beginning")
    assert first["response"].startswith("EN el principio")


# GPT classification ----------------------------------------------------------------------------


def test_gpt_classify_reads_the_last_real_token_and_its_gradient_flows():
    cfg = ModelConfig.preset("gpt2-tiny", num_labels=3)
    model = build(cfg, rngs=nnx.Rngs(0))
    assert model.classifier.kernel.shape == (64, 3)
    lengths = np.array([5, 9, 1, 12])
    seg = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)
    tokens = np.where(seg > 0, np.random.default_rng(0).integers(1, 512, (4, 12)), 0)
    # Jitted, logits and hidden states in one program: eager dispatch compiles each op.
    run = nnx.jit(lambda m, t, s: (m.classify(t, segment_ids=s), m.features(t, segment_ids=s)[0]))
    logits, hidden = run(model, jnp.asarray(tokens), jnp.asarray(seg))
    manual = np.asarray(hidden)[np.arange(4), lengths - 1] @ np.asarray(model.classifier.kernel)
    np.testing.assert_allclose(logits, manual, rtol=1e-5, atol=1e-6)
    # No segment ids: the last position of every row.
    full, h_full = run(model, jnp.asarray(tokens), None)
    np.testing.assert_allclose(full, h_full[:, -1] @ model.classifier.kernel[...], rtol=1e-5)

    # d logits / d input embeddings: nonzero on every real token, exactly zero on the
    # padding after it (causal attention: nothing to the right reaches the last real token).
    embeds = model.embed.embedding[...][jnp.asarray(tokens)]

    def loss(e):
        out = model.classify(inputs_embeds=e, segment_ids=jnp.asarray(seg))
        return jnp.sum(out * jnp.arange(1.0, 4.0))

    g = np.abs(np.asarray(jax.jit(jax.grad(loss))(embeds))).sum(-1)
    assert (g[seg > 0] > 0).all() and (g[seg == 0] == 0).all()
    graphdef, state = nnx.split(model)

    def param_loss(state):
        out = nnx.merge(graphdef, state).classify(jnp.asarray(tokens), segment_ids=jnp.asarray(seg))
        return jnp.sum(out * jnp.arange(1.0, 4.0))

    grads = nnx.to_pure_dict(jax.jit(jax.grad(param_loss))(state))
    assert float(jnp.abs(grads["classifier"]["kernel"]).sum()) > 0
    assert float(jnp.abs(grads["layers"]["blocks"]["mlp"]["wi"]["kernel"]).sum()) > 0


def test_gpt_classifier_config_rules():
    base = build(ModelConfig.preset("gpt2-tiny"), rngs=nnx.Rngs(0))
    assert base.classifier is None
    with pytest.raises(ValueError, match="build it with num_labels > 0"):
        base.classify(jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="T5 classifies text-to-text"):
        ModelConfig.preset("t5-tiny", num_labels=2)
    with pytest.raises(ValueError, match="num_labels=-1 must be"):
        ModelConfig.preset("gpt2-tiny", num_labels=-1)
    # The head is new parameters only: every other parameter is initialised as before.
    with_head = build(ModelConfig.preset("gpt2-tiny", num_labels=2), rngs=nnx.Rngs(0))
    a = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    b = nnx.to_pure_dict(nnx.state(with_head, nnx.Param))
    assert set(b) - set(a) == {"classifier"}
    jax.tree.map(np.testing.assert_array_equal, a, {k: b[k] for k in a})


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_gpt_classifier_matches_transformers_and_round_trips(preset, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llm_jax import convert
    from llm_jax.convert.hf_config import HFSpec

    cfg = ModelConfig.preset(preset, num_labels=3)
    model = build(cfg, rngs=nnx.Rngs(1))
    arch = (
        "GPT2ForSequenceClassification"
        if preset == "gpt2-tiny"
        else ("LlamaForSequenceClassification")
    )
    spec = HFSpec(arch, "gpt2" if preset == "gpt2-tiny" else "llama", pad_id=0)
    if cfg.tie_embeddings:
        out = convert.save_hf(model, tmp_path / "ours", spec=spec)
    else:  # the LLaMA preset's untied LM head has no place in the classifier class
        with pytest.warns(UserWarning, match="untied lm_head is not written"):
            out = convert.save_hf(model, tmp_path / "ours", spec=spec)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == [arch] and len(hf_cfg["id2label"]) == 3

    lengths = np.array([4, 10, 7])
    seg = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    tokens = np.where(seg > 0, np.random.default_rng(1).integers(1, 512, (3, 10)), 0)
    ours = np.asarray(model.classify(jnp.asarray(tokens), segment_ids=jnp.asarray(seg)))
    hf = getattr(transformers, arch).from_pretrained(out).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens), attention_mask=torch.tensor(seg)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)

    # transformers' own save of it loads back into the same parameters (the LM head aside).
    hf.save_pretrained(tmp_path / "theirs")
    back = convert.load_hf(tmp_path / "theirs")
    assert back.cfg.num_labels == 3 and back.cfg.tie_embeddings
    mine = convert.params_of(model)
    mine.pop("lm_head", None)
    jax.tree.map(np.testing.assert_array_equal, convert.params_of(back), mine)


def test_gpt_classification_trains_to_100_percent_through_llm_jax_train(tmp_path):
    from llm_jax.convert import restore_model
    from llm_jax.data import load_tokenizer
    from llm_jax.train.config import config_from_dict
    from llm_jax.train.loop import train

    rng = np.random.default_rng(0)
    words = "the film plot cast was really quite very a story acting music".split()
    lines = []
    for i in range(32):
        label = ("neg", "pos")[i % 2]
        text = rng.choice(words, size=rng.integers(2, 6)).tolist()
        text.insert(int(rng.integers(0, len(text) + 1)), "good" if label == "pos" else "bad")
        lines.append(f"__label__{label} {' '.join(text)}")
    path = tmp_path / "reviews.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = {
        "name": "gpt_cls",
        "workdir": str(tmp_path / "runs"),
        "model": {
            "preset": "gpt2-tiny", "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64,
            "max_position_embeddings": 48, "num_labels": 2,
        },
        "data": {
            "paths": [str(path)], "format": "fasttext", "objective": "classification",
            "tokenizer_type": "char", "vocab_size": None, "tokenizer_path": str(tmp_path / "tok"),
            "seq_len": 48, "batch_size": 8, "use_cache": False,
        },
        "train": {
            "steps": 40, "log_every": 10, "eval_every": 0, "checkpoint_every": 40,
            "progress": False, "async_checkpoint": False,
        },
        "optimizer": {"learning_rate": 1.0e-2, "warmup_steps": 2, "schedule": "constant"},
    }  # fmt: skip
    result = train(config_from_dict(run))
    assert result.final_step == 40 and result.losses[40] < result.losses[1]
    model = restore_model(result.checkpoint_dir).model
    data = DataConfig(**{**run["data"], "paths": (str(path),)})
    batch = load_source(data, load_tokenizer(tmp_path / "tok")).build(np.arange(32), 0)
    logits = model.classify(
        jnp.asarray(batch["tokens"]),
        segment_ids=jnp.asarray(batch["segment_ids"]),
        positions=jnp.asarray(batch["positions"]),
    )
    accuracy = float((np.argmax(logits, -1) == batch["labels"]).mean())
    assert accuracy == 1.0, accuracy


# Classification rows -------------------------------------------------------------------------


def test_framed_row_is_bert_pair_row_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.integers(7, 99, rng.integers(0, 20)).astype(np.int32)
        b = None if rng.random() < 0.3 else rng.integers(7, 99, rng.integers(0, 20))
        length = int(rng.integers(4, 30))
        want = pair_row(a, b, length, 4, 5)
        got = classification.framed_row(a, b, length, 4, 5, 5)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(w, g)


def test_classification_rows_without_cls_and_sep(tmp_path, tok, token_cache):
    path = tmp_path / "nli.tsv"
    path.write_text("yes\tA man sleeps.\tSomeone rests.\nno\tA cat runs.\tNothing moves.\n")
    cfg = DataConfig(
        paths=(str(path),), format="tsv", objective="classification", label_column=0,
        text_columns=(1, 2), seq_len=32, batch_size=2, cache_dir=token_cache,
    )  # fmt: skip
    gpt_tok = _without(tok, "cls", "sep")
    b = load_source(cfg, gpt_tok).build(np.arange(2), 0)
    a, second = gpt_tok.encode("A man sleeps."), gpt_tok.encode("Someone rests.")
    row = [tok.bos_id, *a, tok.eos_id, *second, tok.eos_id]
    n = len(row)
    np.testing.assert_array_equal(b["tokens"][0], row + [0] * (32 - n))
    np.testing.assert_array_equal(
        b["token_type_ids"][0, :n], [0] * (len(a) + 2) + [1] * (n - len(a) - 2)
    )
    np.testing.assert_array_equal(b["segment_ids"][0], [1] * n + [0] * (32 - n))
    # A <sep> without <cls> separates the pair; no BOS with add_bos=False.
    b = load_source(cfg.replace(add_bos=False), _without(tok, "cls")).build(np.arange(1), 0)
    np.testing.assert_array_equal(b["tokens"][0, : n - 1], [*a, tok.sep_id, *second, tok.eos_id])
    # A single text: [bos] text [eos].
    single = cfg.replace(text_columns=(1,))
    b = load_source(single, gpt_tok).build(np.arange(1), 0)
    np.testing.assert_array_equal(b["tokens"][0, : len(a) + 2], [tok.bos_id, *a, tok.eos_id])
    with pytest.raises(ValueError, match=r"needs the special token\(s\) \['eos'\]"):
        load_source(cfg, _without(tok, "cls", "sep", "eos"))


# T5 text-to-text classification -----------------------------------------------------------


def _fasttext(tmp_path):
    path = tmp_path / "reviews.txt"
    path.write_text(
        "__label__pos A gorgeous film.\n__label__neg Too tepid.\n\n__label__pos Fun!\n",
        encoding="utf-8",
    )
    return path


def test_seq2seq_reads_fasttext_with_the_label_word_as_target(tmp_path, tok, token_cache):
    path = _fasttext(tmp_path)
    cfg = DataConfig(
        paths=(str(path),), format="fasttext", objective="seq2seq", seq_len=16,
        target_seq_len=8, batch_size=2, pack=False, cache_dir=token_cache,
    )  # fmt: skip
    texts = ["A gorgeous film.", "Too tepid.", "Fun!"]
    for config, words in [
        (cfg, ["pos", "neg", "pos"]),
        (
            cfg.replace(label_names=("neg", "pos"), label_words=("negative", "positive")),
            ["positive", "negative", "positive"],
        ),
    ]:
        b = load_source(config, tok).build(np.arange(3), 0)
        for i, (text, word) in enumerate(zip(texts, words, strict=True)):
            enc = b["encoder_tokens"][i][b["encoder_segment_ids"][i] > 0]
            dec = b["decoder_targets"][i][b["decoder_segment_ids"][i] > 0]
            np.testing.assert_array_equal(enc, [*tok.encode(text), tok.eos_id])
            np.testing.assert_array_equal(dec, [*tok.encode(word), tok.eos_id])
            np.testing.assert_array_equal(b["decoder_weights"][i], b["decoder_segment_ids"][i] > 0)
    # The seq2seq loss runs on these batches with a T5.
    model = build(ModelConfig.preset("t5-tiny", vocab_size=tok.vocab_size), rngs=nnx.Rngs(0))
    total, count = LOSSES["seq2seq"](model, jax.tree.map(jnp.asarray, b), None, LossConfig())["lm"]
    assert np.isfinite(float(total)) and float(count) == b["decoder_weights"].sum()


def test_seq2seq_fasttext_label_errors(tmp_path, tok, token_cache):
    path = _fasttext(tmp_path)
    base = dict(paths=(str(path),), format="fasttext", objective="seq2seq", cache_dir=token_cache)
    with pytest.raises(ValueError, match=r"labels \['pos'\] are not in DataConfig.label_names"):
        load_source(DataConfig(**base, label_names=("neg",)), tok)
    with pytest.raises(ValueError, match="give label_names of the same length"):
        DataConfig(**base, label_words=("negative", "positive"))
    with pytest.raises(ValueError, match="label_words names the target word"):
        DataConfig(
            **{**base, "objective": "classification"},
            label_names=("neg", "pos"),
            label_words=("negative", "positive"),
        )


def test_seq2seq_on_the_real_sentiment_files(shared_data, tok, token_cache):
    cfg = DataConfig(
        paths=(str(shared_data / "sentiment-mr.dev.txt"),), format="fasttext",
        objective="seq2seq", seq_len=128, target_seq_len=8, batch_size=8, pack=False,
        label_names=("neg", "pos"), label_words=("negative", "positive"), cache_dir=token_cache,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few long reviews are truncated
        src = load_source(cfg, tok)
    assert src.num_examples == 1056
    b = src.build(np.arange(1056), 0)
    words = {(*tok.encode(w), tok.eos_id) for w in ("negative", "positive")}
    targets = b["decoder_targets"]
    segs = b["decoder_segment_ids"]
    assert {tuple(t[s > 0]) for t, s in zip(targets, segs, strict=True)} == words
