"""`llm_jax.eval` and `llm-jax eval`: the log-likelihood scorer against float64 twins and the
PyTorch fixtures, sliding-window perplexity, multiple choice on a model with known
probabilities, few-shot prompts, generation scores against sacrebleu / rouge-score, the bad
inputs, and the command end to end on the committed fixtures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import llm_jax as lj
from llm_jax.cli import main
from llm_jax.data.objectives.classification import row_specials
from llm_jax.eval import api, loglik, tasks
from llm_jax.eval import data as data_lib
from tests.reference.eval_ref import target_scores_ref, window_coverage_ref

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
EXPECTED = json.loads((FIXTURES / "eval_expected.json").read_text())
LL_RTOL = 1e-5


@pytest.fixture(scope="module")
def gpt2():
    return lj.convert.load_hf(FIXTURES / "gpt2"), lj.convert.load_hf_tokenizer(FIXTURES / "gpt2")


# The scorer ----------------------------------------------------------------------------------


def test_target_scores_match_the_twin():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, (3, 5)).astype(np.int32)
    targets[2] = np.argmax(logits[2], -1)  # a row greedy decoding reproduces
    weights = np.array([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.float32)
    ll, greedy = loglik.target_scores(jnp.asarray(logits), jnp.asarray(targets), weights)
    want_ll, want_greedy = target_scores_ref(logits, targets, weights)
    np.testing.assert_allclose(np.asarray(ll), want_ll, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(greedy), want_greedy)
    assert want_greedy[2]


@pytest.mark.parametrize(
    ("n", "max_length", "stride"), [(40, 8, 3), (40, 8, 8), (9, 8, 2), (30, 5, 1)]
)
@pytest.mark.parametrize("prefix", [None, 99])
def test_rolling_windows_score_every_token_once_as_the_recipe(n, max_length, stride, prefix):
    ids = list(range(n))
    requests = loglik.rolling_requests(ids, prefix, max_length, stride)
    seq = ([prefix] if prefix is not None else []) + ids
    scored, begin_of = [], {}
    for r in requests:
        assert 1 <= len(r.context) and len(r.context) + len(r.continuation) <= max_length + 1
        # The window is a contiguous slice of the sequence: context then continuation.
        start = seq.index(r.context[0]) if r.context[0] != prefix else 0
        assert (
            list(r.context + r.continuation) == seq[start : start + len(r.context + r.continuation)]
        )
        for k in range(len(r.continuation)):
            begin_of[start + len(r.context) + k] = start
        scored += r.continuation
    assert scored == seq[1:]  # every token after the first, once, in order
    assert begin_of == window_coverage_ref(len(seq), max_length, stride)


def test_rolling_windows_reject_a_bad_stride():
    with pytest.raises(ValueError, match="stride must be in"):
        loglik.rolling_requests([1, 2, 3], 0, 4, 5)


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5"])
def test_fixture_loglikelihoods_equal_pytorch_float64(name):
    model = lj.convert.load_hf(FIXTURES / name)
    pairs = EXPECTED[name]["pairs"]
    requests = [loglik.Request.of(p["context"], p["continuation"]) for p in pairs]
    scores = loglik.loglikelihood(model, requests, batch_size=4)
    got = [s.loglikelihood for s in scores]
    np.testing.assert_allclose(got, [p["loglikelihood"] for p in pairs], rtol=LL_RTOL)
    assert [s.num_tokens for s in scores] == [len(p["continuation"]) for p in pairs]


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_fixture_sliding_window_perplexity_equals_the_hf_recipe(name):
    want = EXPECTED[name]
    model = lj.convert.load_hf(FIXTURES / name)
    tok = lj.convert.load_hf_tokenizer(FIXTURES / name)
    prompting = tasks.Prompting(add_bos=False)  # the recipe's prefix is EOS
    windows = tasks.perplexity_windows(
        model,
        tok,
        [want["text"]],
        prompting=prompting,
        max_length=want["window"],
        stride=want["stride"],
    )
    assert len(windows.requests) > 3  # the text really is cut into windows
    out = tasks.perplexity(model, windows, batch_size=4)
    assert out["tokens"] == want["tokens"]
    np.testing.assert_allclose(out["perplexity"], want["perplexity"], rtol=LL_RTOL)
    n_bytes = len(want["text"].encode())
    np.testing.assert_allclose(
        out["bits_per_byte"], want["nll_sum"] / (n_bytes * math.log(2)), rtol=LL_RTOL
    )


def test_live_expected_values_match_pytorch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.fixtures.make_eval_expected import expected

    live = expected()
    for name, want in EXPECTED.items():
        got = [p["loglikelihood"] for p in live[name]["pairs"]]
        np.testing.assert_allclose(got, [p["loglikelihood"] for p in want["pairs"]], rtol=1e-9)
        if "perplexity" in want:
            np.testing.assert_allclose(live[name]["perplexity"], want["perplexity"], rtol=1e-9)


def test_sliding_window_equals_the_full_window_when_the_text_fits(gpt2):
    model, tok = gpt2
    text = "First Citizen: Before we proceed any further, hear me."
    n = len(tok.encode(text))
    assert n + 1 <= 64
    prompting = tasks.Prompting()
    full = tasks.perplexity(
        model,
        tasks.perplexity_windows(model, tok, [text], prompting=prompting),
        batch_size=2,
    )
    # The same text as one request scored directly, and windows of every stride that fit.
    direct = loglik.loglikelihood(model, [loglik.Request.of([tok.eos_id], tok.encode(text))])[0]
    np.testing.assert_allclose(full["nll"], -direct.loglikelihood / n, rtol=1e-6)
    for stride in (1, 7, 64):
        windows = tasks.perplexity_windows(model, tok, [text], prompting=prompting, stride=stride)
        assert len(windows.requests) == 1
        got = tasks.perplexity(model, windows, batch_size=2)
        np.testing.assert_allclose(got["perplexity"], full["perplexity"], rtol=1e-6)


# Multiple choice on a model with known probabilities -------------------------------------------


class CharTokenizer:
    """a..z -> 1..26, space -> 27; EOS 0, no BOS."""

    bos_id, eos_id, pad_id = None, 0, 0

    def encode(self, text):
        return [27 if c == " " else ord(c) - 96 for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(" " if i == 27 else chr(i + 96) for i in ids if i)


class Bigram(nnx.Module):
    """log p(next | current) = `table[current]`: probabilities known in closed form."""

    def __init__(self, probs: np.ndarray):
        self.cfg = lj.ModelConfig(
            family="gpt",
            vocab_size=28,
            d_model=4,
            num_layers=1,
            num_heads=1,
            d_ff=4,
            max_position_embeddings=32,
        )
        self.table = nnx.Param(jnp.log(jnp.asarray(probs, jnp.float32)))

    def __call__(self, tokens, *, positions=None, segment_ids=None):
        return self.table[...][tokens]


def _bigram() -> Bigram:
    probs = np.full((28, 28), 1e-3)
    a, b, c, d = 1, 2, 3, 4
    probs[a, b], probs[a, c] = 0.5, 0.4  # after a: b (p .5) or c (p .4)
    probs[c, c] = 0.9  # c c is likely once started
    probs[d, b], probs[d, c] = 0.1, 0.8
    return Bigram(probs / probs.sum(1, keepdims=True))


def test_acc_and_acc_norm_on_known_probabilities():
    model, tok = _bigram(), CharTokenizer()
    items = [
        # "b": log .5 = -0.69 beats "cc": log .4 + log .9 = -1.02 (acc picks b), but per
        # character "cc" (-0.51) beats "b" (-0.69): acc_norm picks cc, the answer.
        data_lib.Choice("a", ("b", "cc"), 1),
        # after d: c (.8) beats b (.1) under both rules.
        data_lib.Choice("d", ("b", "c"), 1),
    ]
    prompting = tasks.Prompting(template="{context}{choice}")
    requests = tasks.choice_requests(tok, items, prompting)
    scores = loglik.loglikelihood(model, requests, batch_size=4)
    table = np.exp(np.asarray(model.table[...], np.float64))
    want = [math.log(table[1, 2]), math.log(table[1, 3] * table[3, 3])]
    want += [math.log(table[4, 2]), math.log(table[4, 3])]
    np.testing.assert_allclose([s.loglikelihood for s in scores], want, rtol=1e-5)
    out = tasks.multiple_choice(model, items, requests, batch_size=4)
    assert out["acc"] == 0.5 and out["acc_norm"] == 1.0
    assert [s.is_greedy for s in scores] == [True, False, False, True]


def test_fewshot_prompts_are_seeded_and_never_hold_the_item():
    pool = [data_lib.Choice(f"q{i}", ("x", "y"), i % 2) for i in range(6)]
    draws = [data_lib.fewshot_indices(6, i, 3, seed=7) for i in range(6)]
    assert draws == [data_lib.fewshot_indices(6, i, 3, seed=7) for i in range(6)]
    assert all(i not in d and len(set(d)) == 3 for i, d in enumerate(draws))
    assert draws != [data_lib.fewshot_indices(6, i, 3, seed=8) for i in range(6)]
    text = data_lib.fewshot_prompt("Q: {context}\nA: {choice}", [pool[1], pool[2]])
    assert text == "Q: q1\nA: y\n\nQ: q2\nA: x\n\n"
    with pytest.raises(ValueError, match="needs 6 other examples; the pool has 5"):
        data_lib.fewshot_indices(6, 0, 6, seed=0)
    # A separate few-shot file may be drawn from entirely, and each item gets its own draw.
    assert sorted(data_lib.fewshot_indices(3, 0, 3, seed=0, same_file=False)) == [0, 1, 2]
    other = [data_lib.fewshot_indices(50, i, 3, seed=7, same_file=False) for i in range(6)]
    assert len({tuple(d) for d in other}) == 6


def test_template_moves_the_space_into_the_continuation():
    assert data_lib.split_template("{context} {choice}", "The sky is", "blue") == (
        "The sky is",
        " blue",
    )
    assert data_lib.split_template("Q: {context}\nA: {choice}.", "q", "a") == ("Q: q\nA:", " a.")


# Generation scores ---------------------------------------------------------------------------


def test_generation_scores_equal_sacrebleu_and_rouge_score():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    refs = [
        "In the beginning God created the heaven. And the earth was void.",
        "Let there be light.",
    ]
    # Sentences swapped: ROUGE-L's one LCS keeps one of them, Lsum's per-sentence LCS both.
    hyps = ["The earth was empty. In the beginning God made the heaven.", "Let there be light."]
    got = tasks.score_generations(hyps, refs)
    assert got["bleu"] == BLEU().corpus_score(hyps, [refs]).score
    assert got["chrf"] == CHRF().corpus_score(hyps, [refs]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    lsum_refs = ["In the beginning God created the heaven.\nAnd the earth was void.", refs[1]]
    lsum_hyps = ["The earth was empty.\nIn the beginning God made the heaven.", hyps[1]]
    for kind in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        each = [
            scorer.score(r, h)[kind].fmeasure for r, h in zip(lsum_refs, lsum_hyps, strict=True)
        ]
        assert got[kind] == pytest.approx(100 * np.mean(each), rel=1e-12)
    assert got["rougeLsum"] > got["rougeL"]  # the sentence split matters
    assert got["exact_match"] == 0.5


# Bad input -----------------------------------------------------------------------------------


@pytest.fixture()
def no_compile(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("compiled before the input was checked")

    monkeypatch.setattr(loglik, "score_batch", refuse)


def test_bad_inputs_fail_with_line_numbers(tmp_path, gpt2, no_compile):
    model, tok = gpt2
    with pytest.raises(ValueError, match="unknown task 'ppl'; choose one of"):
        api.evaluate(model, tok, "ppl", tmp_path / "x")
    bad = tmp_path / "mc.jsonl"
    bad.write_text('{"context": "a", "choices": ["x", "y"], "answer": 0}\n{"context": "b"}\n')
    with pytest.raises(ValueError, match=r"mc.jsonl:2: expected \"choices\""):
        api.evaluate(model, tok, "multiple_choice", bad)
    bad.write_text('{"context": "a", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(ValueError, match=r"mc.jsonl:1: \"answer\" 2 is not in \[0, 2\)"):
        api.evaluate(model, tok, "multiple_choice", bad)
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:1 is not JSON"):
        api.evaluate(model, tok, "multiple_choice", bad)
    cloze = tmp_path / "cloze.txt"
    cloze.write_text("a fine passage here\n\nlonely\n")
    with pytest.raises(ValueError, match=r"cloze.txt:3: a cloze passage needs at least two"):
        api.evaluate(model, tok, "cloze", cloze)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("source only\n")
    with pytest.raises(ValueError, match=r"pairs.tsv:1 has 1 tab-separated column"):
        api.evaluate(model, tok, "generation", pairs)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        api.evaluate(model, tok, "perplexity", empty)


def test_impossible_prompts_fail_before_compiling(tmp_path, gpt2, no_compile):
    model, tok = gpt2
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"context": "word " * 80, "choices": ["a", "b"], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match=r"fewer\s+--shots"):
        api.evaluate(model, tok, "multiple_choice", mc)
    mc.write_text(json.dumps({"context": "The king", "choices": ["a", " "], "answer": 0}) + "\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:1: choice 1 is empty"):
        api.evaluate(model, tok, "multiple_choice", mc)
    item = data_lib.Choice("The king", ("a", ""), 0)
    with pytest.raises(ValueError, match=r"item 1: choice 1 \(''\) tokenizes to nothing"):
        tasks.choice_requests(tok, [item], tasks.Prompting(template="{context}{choice}"))
    text = tmp_path / "t.txt"
    text.write_text("some text")
    with pytest.raises(ValueError, match=r"--max-length 65 must be in \[1, 64\]"):
        api.evaluate(model, tok, "perplexity", text, max_length=65)
    with pytest.raises(ValueError, match="scores a causal LM"):
        api.evaluate(lj.convert.load_hf(FIXTURES / "t5"), tok, "perplexity", text)


def test_unknown_classification_labels_fail(tmp_path, no_compile):
    model = lj.models.build(
        lj.ModelConfig.preset("bert-tiny").replace(
            num_labels=2, d_model=16, num_heads=2, d_ff=32, num_layers=1, vocab_size=200
        ),
        rngs=nnx.Rngs(0),
    )
    data = tmp_path / "reviews.txt"
    data.write_text("__label__pos good\n__label__meh fine\n")
    with pytest.raises(ValueError, match=r"labels \['meh'\] in the data are not among"):
        api.evaluate(model, CharTokenizer(), "classification", data, labels=["neg", "pos"])


# The command ---------------------------------------------------------------------------------


def _run(capsys, *argv) -> dict:
    assert main(["eval", "--quiet", *map(str, argv)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_cli_perplexity_prints_and_writes_the_json(tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(EXPECTED["gpt2"]["text"])
    out = tmp_path / "result.json"
    result = _run(
        capsys,
        "--hf",
        FIXTURES / "gpt2",
        "--task",
        "perplexity",
        "--data",
        text,
        "--max-length",
        EXPECTED["gpt2"]["window"],
        "--stride",
        EXPECTED["gpt2"]["stride"],
        "--out",
        out,
    )
    assert json.loads(out.read_text()) == result
    np.testing.assert_allclose(
        result["metrics"]["perplexity"], EXPECTED["gpt2"]["perplexity"], rtol=LL_RTOL
    )
    assert result["data_sha256"] == data_lib.file_sha256(text)
    assert result["model"].startswith("Hugging Face model from")
    assert result["settings"]["add_bos"] is False and result["tokens_per_second"] > 0


def test_cli_sentiment_few_shot_and_cloze(tmp_path, capsys):
    reviews = tmp_path / "reviews.txt"
    reviews.write_text(
        "__label__pos fine\n__label__neg dull\n__label__pos warm\n__label__neg a mess\n"
    )
    result = _run(
        capsys, "--hf", FIXTURES / "gpt2", "--task", "sentiment", "--data", reviews, "--shots", 1
    )
    assert result["examples"] == 4 and 0 <= result["metrics"]["acc"] <= 1
    assert result["settings"]["template"] == data_lib.SENTIMENT_TEMPLATE
    passages = tmp_path / "passages.txt"
    passages.write_text("the king is dead long live the king\nto be or not to be\n")
    result = _run(capsys, "--hf", FIXTURES / "gpt2", "--task", "cloze", "--data", passages)
    assert result["metrics"]["perplexity"] > 1 and result["examples"] == 2


def test_cli_generation_writes_hypotheses_and_signature(tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    rows = (Path(__file__).parent / "data" / "bible-en-es.tsv").read_text().splitlines()[:3]
    pairs.write_text("\n".join(rows) + "\n")
    out = tmp_path / "gen.json"
    result = _run(
        capsys,
        "--hf",
        FIXTURES / "t5",
        "--task",
        "generation",
        "--data",
        pairs,
        "--max-new-tokens",
        4,
        "--source-column",  # verse, English, Spanish
        1,
        "--target-column",
        2,
        "--out",
        out,
    )
    hyps = Path(result["hypotheses"]).read_text().splitlines()
    assert len(hyps) == 3
    assert result["settings"]["strategy"] == "beam" and result["settings"]["num_beams"] == 4
    assert "tok:13a" in result["sacrebleu"]
    refs = [r.split("\t")[2] for r in rows]
    assert result["metrics"] == pytest.approx(
        {k: v for k, v in tasks.score_generations(hyps, refs).items() if k != "signature"}
    )


def test_cli_classification_matches_the_model_and_draws_the_matrix(tmp_path, capsys):
    from llm_jax.data.tokenizer import train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a good film, warm and funny.\ndull, long and a mess.\n" * 10)
    tok = train_tokenizer(corpus, model_type="char", vocab_size=None, num_sentinels=0)
    cfg = lj.ModelConfig.preset("bert-tiny").replace(
        num_labels=2,
        d_model=16,
        num_heads=2,
        d_ff=32,
        num_layers=1,
        vocab_size=tok.vocab_size,
        max_position_embeddings=32,
    )
    model = lj.models.build(cfg, rngs=nnx.Rngs(3))
    lj.convert.save_checkpoint(model, tmp_path / "ckpt", tokenizer=tok)
    data = tmp_path / "test.txt"
    texts = ["a good film", "dull and long", "warm", "a mess", "funny film", "long"]
    labels = ["pos", "neg", "pos", "neg", "pos", "neg"]
    data.write_text("".join(f"__label__{y} {x}\n" for x, y in zip(texts, labels, strict=True)))
    out = tmp_path / "cls.json"
    result = _run(
        capsys,
        "--checkpoint",
        tmp_path / "ckpt",
        "--task",
        "classification",
        "--data",
        data,
        "--labels",
        "neg,pos",
        "--batch-size",
        4,
        "--out",
        out,
    )
    assert Path(result["confusion_png"]).stat().st_size > 1000
    # The same rows classified directly.
    first, mid, _, _ = row_specials(tok, True)
    # Jitted: eager dispatch compiles every op again for each of the five row lengths.
    classify = nnx.jit(lambda m, ids: m.classify(ids, segment_ids=jnp.ones_like(ids)))
    want = []
    for text in texts:
        ids = [first, *tok.encode(text), mid]
        logits = classify(model, jnp.asarray([ids], jnp.int32))
        want.append(int(np.argmax(np.asarray(logits)[0])))
    truth = [["neg", "pos"].index(y) for y in labels]
    confusion = np.zeros((2, 2), int)
    for t, p in zip(truth, want, strict=True):
        confusion[t, p] += 1
    assert result["metrics"]["confusion"] == confusion.tolist()
    assert result["metrics"]["accuracy"] == pytest.approx(np.trace(confusion) / 6)
    assert set(result["metrics"]["per_class"]) == {"neg", "pos"}


def test_cli_split_scores_the_runs_own_held_out_chunks(tmp_path, capsys):
    from llm_jax.train.config import config_from_dict
    from llm_jax.train.loop import train
    from tests.test_sample_cli import CONFIG

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((Path(__file__).parent / "data" / "shakespeare.txt").read_text()[:4000])
    cfg = {**CONFIG, "workdir": str(tmp_path / "run")}
    cfg["data"] = {**CONFIG["data"], "paths": [str(corpus)], "validation_fraction": 0.2}
    cfg["train"] = {**CONFIG["train"], "eval_every": 6, "eval_batches": 1000}
    train(config_from_dict(cfg))
    result = _run(
        capsys, "--checkpoint", tmp_path / "run", "--task", "perplexity", "--split", "validation"
    )
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    held_out = [r for r in records if "eval/lm_loss" in r and r["step"] == 6][-1]
    # The same chunks the run's evaluation read, every one: the same mean NLL.
    np.testing.assert_allclose(result["metrics"]["nll"], held_out["eval/lm_loss"], rtol=1e-5)
    assert result["settings"]["split"] == "validation" and result["metrics"]["bits_per_byte"] > 0
