"""Task metrics: the classification step and scores against float64 NumPy twins, BLEU/chrF
plumbing, the fixed ("last") validation range, the test split, and two tiny end-to-end runs
(a classifier writing dev and test metrics, a T5 translator writing hypotheses and scores)."""

import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.cli import main
from llm_jax.data import DataConfig
from llm_jax.data.splits import split_indices
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.models import build
from llm_jax.models.config import ModelConfig
from llm_jax.sample import DecoderInfo, FunctionDecoder
from llm_jax.train import task_eval
from llm_jax.train.config import TrainConfig, check_data_paths, config_from_dict
from llm_jax.train.loop import train
from llm_jax.train.metrics import MetricsWriter, read_metrics
from tests.reference.metrics_ref import classification_scores_ref, confusion_ref

# Metrics against the twins -------------------------------------------------------------------


def test_confusion_counts_match_the_twin_and_skip_padding_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(37, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 37)
    weights = (rng.random(37) > 0.2).astype(np.float32)
    got = jax.jit(task_eval.confusion_counts)(logits, labels, weights)
    np.testing.assert_array_equal(
        np.asarray(got, np.float64), confusion_ref(logits, labels, weights)
    )
    assert float(got.sum()) == weights.sum()


def test_classification_metrics_match_the_twin():
    rng = np.random.default_rng(1)
    for num_classes in (2, 3, 6):
        logits = rng.normal(size=(50, num_classes))
        labels = rng.integers(0, num_classes, 50)
        weights = (rng.random(50) > 0.1).astype(np.float64)
        m = task_eval.classification_metrics(confusion_ref(logits, labels, weights))
        accuracy, macro_f1, per_class = classification_scores_ref(
            np.argmax(logits, -1), labels, weights
        )
        np.testing.assert_allclose(m["accuracy"], accuracy, rtol=1e-12)
        np.testing.assert_allclose(m["macro_f1"], macro_f1, rtol=1e-12)
        for c, (precision, recall) in per_class.items():
            np.testing.assert_allclose([m["precision"][c], m["recall"][c]], [precision, recall])


def test_classification_metrics_on_a_literal_matrix():
    # Rows true, columns predicted. Class 2 of the head never occurs: left out of macro-F1.
    confusion = np.array([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    m = task_eval.classification_metrics(confusion)
    assert m["accuracy"] == 0.7
    np.testing.assert_allclose(m["precision"], [3 / 5, 4 / 5, 0])
    np.testing.assert_allclose(m["recall"], [3 / 4, 4 / 6, 0])
    f1 = [2 * 0.6 * 0.75 / 1.35, 2 * 0.8 * (4 / 6) / (0.8 + 4 / 6)]
    np.testing.assert_allclose(m["macro_f1"], np.mean(f1), rtol=1e-12)


def test_classification_eval_step_matches_the_model_and_the_twins():
    cfg = ModelConfig.preset("bert-tiny").replace(
        num_labels=3, d_model=32, num_heads=2, d_ff=64, num_layers=1
    )
    graphdef, params = nnx.split(build(cfg, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(2)
    tokens = rng.integers(8, cfg.vocab_size, (8, 12)).astype(np.int32)
    batch = {
        "tokens": tokens,
        "token_type_ids": np.zeros_like(tokens),
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(12, dtype=np.int32), tokens.shape).copy(),
        "labels": rng.integers(0, 3, 8).astype(np.int32),
        "label_weights": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32),  # two padding rows
    }
    out = jax.device_get(task_eval.classification_eval_step(params, batch, graphdef=graphdef))
    model = nnx.merge(graphdef, params)
    logits = np.asarray(
        model.classify(
            jnp.asarray(tokens),
            token_type_ids=jnp.asarray(batch["token_type_ids"]),
            segment_ids=jnp.asarray(batch["segment_ids"]),
            positions=jnp.asarray(batch["positions"]),
        ),
        np.float64,
    )
    want = confusion_ref(logits, batch["labels"], batch["label_weights"])
    np.testing.assert_array_equal(np.asarray(out["confusion"], np.float64), want)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -log_p[np.arange(8), batch["labels"]] @ batch["label_weights"]
    np.testing.assert_allclose(float(out["cls"][0]), nll, rtol=1e-4)
    assert float(out["cls"][1]) == 6.0


# BLEU / chrF ---------------------------------------------------------------------------------


def test_a_perfect_copy_scores_100():
    refs = [
        "In the beginning God created the heaven and the earth.",
        "And God said, Let there be light.",
    ]
    scores = task_eval.score_translations(list(refs), refs)
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)
    assert scores["exact_match"] == 1.0
    assert "tok:13a" in scores["signature"] and "nc:6" in scores["signature"]
    worse = task_eval.score_translations(["In the beginning God made the sky.", "Light."], refs)
    assert 0 < worse["bleu"] < 100 and 0 < worse["chrf"] < 100 and worse["exact_match"] == 0.0
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        task_eval.score_translations(["a"], refs)


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "text.txt"
    path.write_text("hello world, la luz y la tierra.\nIn the beginning God created.\n" * 20)
    return train_tokenizer(path, model_type="char", vocab_size=None, num_sentinels=0)


def _copy_decoder(vocab_size: int) -> FunctionDecoder:
    """A toy encoder–decoder that writes its encoder input back: step p emits token p."""

    def init_cache(batch_size, max_length, encoder_tokens, encoder_segment_ids):
        return {"encoder": encoder_tokens}

    def tokens_to_logits(tokens, positions, segment_ids, cache):
        source = cache["encoder"]
        index = jnp.clip(positions, 0, source.shape[1] - 1)
        copied = jnp.take_along_axis(source, index, axis=1)  # [B, T]
        return 10.0 * jax.nn.one_hot(copied, vocab_size), cache

    return FunctionDecoder(
        tokens_to_logits, init_cache, DecoderInfo(vocab_size=vocab_size, decoder_start_id=0)
    )


def test_translate_detokenizes_beam_search_output(char_tok):
    sources = ["hello world, la luz", "In the beginning God created.", "y la tierra"]
    decoder = _copy_decoder(char_tok.vocab_size)
    got = task_eval.translate(
        decoder, char_tok, sources, max_source_tokens=64, max_new_tokens=40, num_beams=3
    )
    assert got == sources  # EOS cut, no special pieces, exact text back
    short = task_eval.translate(
        decoder, char_tok, sources[:1], max_source_tokens=6, max_new_tokens=40, num_beams=2
    )
    assert short == ["hello"]  # truncated to max_source_tokens - 1, then EOS, as in training
    assert task_eval.score_translations(got, sources)["bleu"] == pytest.approx(100.0)


# Splits --------------------------------------------------------------------------------------


def test_last_validation_split_is_a_fixed_contiguous_range():
    np.testing.assert_array_equal(
        split_indices(40, 0.1, 7, "validation", how="last"), [36, 37, 38, 39]
    )
    np.testing.assert_array_equal(split_indices(40, 0.1, 7, "train", how="last"), np.arange(36))
    random_val = split_indices(40, 0.1, 7, "validation")
    assert len(random_val) == 4 and random_val.tolist() != [36, 37, 38, 39]
    with pytest.raises(
        ValueError, match=r"validation_split='middle' is not one of \['random', 'last'\]"
    ):
        DataConfig(validation_split="middle")


def test_translation_pairs_are_the_validation_rows(corpora):
    rows = [line.split("\t") for line in (corpora / "bible-en-es.tsv").read_text().splitlines()]
    cfg = DataConfig(
        paths=(str(corpora / "bible-en-es.tsv"),), format="tsv", objective="seq2seq",
        source_column=1, target_column=2, validation_fraction=0.05, validation_split="last",
    )  # fmt: skip
    sources, refs = task_eval.translation_pairs(cfg, "validation", 7)
    assert sources == [r[1] for r in rows[380:387]] and refs == [r[2] for r in rows[380:387]]
    with pytest.raises(ValueError, match=r"set DataConfig\.test_paths"):
        task_eval.translation_pairs(cfg, "test", 7)


def test_bad_eval_settings_fail_at_load(tmp_path):
    with pytest.raises(ValueError, match=r"eval_beams=0 must be an integer >= 1"):
        TrainConfig(eval_beams=0)
    with pytest.raises(ValueError, match=r"eval_generate_examples=-1 must be an integer >= 0"):
        TrainConfig(eval_generate_examples=-1)
    data = {"seq_len": 64, "test_paths": [str(tmp_path / "no.txt")]}
    cfg = config_from_dict({"model": {"preset": "gpt2-tiny"}, "data": data})
    with pytest.raises(ValueError, match=r"data.test_paths: .*no.txt not found"):
        check_data_paths(cfg)


def test_metrics_writer_fields_go_to_the_jsonl_only(tmp_path):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False, loss_curve=False) as w:
        w.write(3, {"test/loss": 0.5}, fields={"split": "test", "test/confusion": [[1, 0], [2, 3]]})
        with pytest.raises(ValueError, match="would overwrite"):
            w.write(4, {"test/loss": 0.5}, fields={"test/loss": 1})
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["split"] == "test" and record["test/confusion"] == [[1, 0], [2, 3]]


# End to end ----------------------------------------------------------------------------------

_TINY_TRAIN = {"log_every": 2, "checkpoint_every": 100, "progress": False}


def _labelled(n: int, seed: int) -> str:
    rng = random.Random(seed)
    words = {"pos": "good great fine lovely".split(), "neg": "bad awful poor dull".split()}
    lines = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        lines.append(f"__label__{label} " + " ".join(rng.choice(words[label]) for _ in range(4)))
    return "\n".join(lines) + "\n"


def test_classification_run_writes_dev_and_test_metrics(tmp_path, capsys):
    for split, n, seed in (("train", 64, 0), ("dev", 20, 1), ("test", 21, 2)):
        (tmp_path / f"{split}.txt").write_text(_labelled(n, seed))
    cfg = {
        "name": "cls",
        "workdir": str(tmp_path / "run"),
        "model": {
            "preset": "bert-tiny", "num_labels": 2, "d_model": 32, "num_heads": 2, "d_ff": 64,
            "num_layers": 1, "max_position_embeddings": 32,
        },
        "data": {
            "paths": [str(tmp_path / "train.txt")], "validation_paths": [str(tmp_path / "dev.txt")],
            "test_paths": [str(tmp_path / "test.txt")], "format": "fasttext",
            "objective": "classification", "tokenizer_type": "char", "vocab_size": None,
            "seq_len": 32, "batch_size": 8, "use_cache": False,
        },
        "train": {**_TINY_TRAIN, "steps": 4, "eval_every": 2},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 1},
    }  # fmt: skip
    result = train(config_from_dict(cfg))
    records = read_metrics(result.metrics_path)
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:  # all 20 dev rows count once; the padding of the last batch counts nothing
        confusion = np.array(r["eval/confusion"])
        assert confusion.sum() == 20 and r["eval/labels"] == ["neg", "pos"]
        assert r["eval/accuracy"] == pytest.approx(np.trace(confusion) / 20)
        assert {"eval/macro_f1", "eval/loss", "eval/precision/pos", "eval/recall/neg"} <= set(r)
    (test,) = [r for r in records if r.get("split") == "test"]
    confusion = np.array(test["test/confusion"])
    assert test["step"] == 4 and confusion.sum() == 21
    predicted = np.repeat(np.tile([0, 1], 2), confusion.ravel())
    labels = np.repeat(np.repeat([0, 1], 2), confusion.ravel())
    accuracy, macro_f1, _ = classification_scores_ref(predicted, labels, np.ones(21))
    assert test["test/accuracy"] == pytest.approx(accuracy)
    assert test["test/macro_f1"] == pytest.approx(macro_f1)
    out = capsys.readouterr().out
    line = f"test: accuracy={accuracy:.4f} macro_f1={macro_f1:.4f} loss={test['test/loss']:.4f}"
    assert line in out


def test_seq2seq_run_decodes_and_scores_the_held_out_rows(tmp_path, corpora, monkeypatch, capsys):
    rows = (corpora / "bible-en-es.tsv").read_text().splitlines()
    (tmp_path / "train.tsv").write_text("\n".join(rows[:100]) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(rows[100:103]) + "\n")
    scored = []

    def spy(hypotheses, references):
        scored.append((list(hypotheses), list(references)))
        return score(hypotheses, references)

    score = task_eval.score_translations
    monkeypatch.setattr(task_eval, "score_translations", spy)
    cfg = {
        "name": "mt",
        "workdir": str(tmp_path / "run"),
        "model": {"preset": "t5-tiny", "d_model": 32, "num_heads": 2, "d_ff": 64, "num_layers": 1},
        "data": {
            "paths": [str(tmp_path / "train.tsv")], "test_paths": [str(tmp_path / "test.tsv")],
            "format": "tsv", "objective": "seq2seq", "source_column": 1, "target_column": 2,
            "tokenizer_type": "char", "vocab_size": None, "seq_len": 64, "target_seq_len": 16,
            "batch_size": 8, "validation_fraction": 0.1, "validation_split": "last",
            "use_cache": False,
        },
        "train": {
            **_TINY_TRAIN, "steps": 2, "eval_every": 2, "eval_batches": 1, "eval_generate": True,
            "eval_generate_examples": 5, "eval_beams": 2,
        },
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": 1},
    }  # fmt: skip
    with pytest.warns(UserWarning, match="truncated"):
        result = train(config_from_dict(cfg))
    # Decoded once per split: at the step-2 evaluation (validation) and at the end (test).
    (val_hyps, val_refs), (test_hyps, test_refs) = scored
    assert val_refs == [r.split("\t")[2] for r in rows[90:95]]  # the last 10% of 100, first 5
    assert test_refs == [r.split("\t")[2] for r in rows[100:103]]
    written = (result.workdir / "hypotheses.txt").read_text().splitlines()
    assert written == val_hyps and len(written) == 5
    assert (result.workdir / "hypotheses.test.txt").read_text().splitlines() == test_hyps
    assert not any("</s>" in h or "<pad>" in h for h in val_hyps + test_hyps)
    records = read_metrics(result.metrics_path)
    (val,) = [r for r in records if "eval/bleu" in r]
    (test,) = [r for r in records if r.get("split") == "test"]
    assert val["step"] == 2 and "eval/chrf" in val and "eval/loss" in val
    assert {"test/bleu", "test/chrf", "test/loss"} <= set(test) and test["test/examples"] == 3
    assert all(0 <= r[k] <= 100 for r, k in ((val, "eval/bleu"), (test, "test/chrf")))
    out = capsys.readouterr().out
    assert f"test: BLEU={test['test/bleu']:.4f} chrF={test['test/chrf']:.4f}" in out
    assert "(sacrebleu signature BLEU nrefs:1|case:mixed|eff:no|tok:13a" in out
    json.dumps(records)  # every record stays plain JSON
    # `llm-jax eval --split validation` reads the same held-out pairs with the run's own
    # columns and lengths, and decodes them as the run's evaluation did.
    argv = ["eval", "--quiet", "--checkpoint", str(result.workdir), "--task", "generation"]
    argv += ["--split", "validation", "--num-beams", "2", "--limit", "5", "--out"]
    assert main([*argv, str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert Path(evaluated["hypotheses"]).read_text().splitlines() == val_hyps
    assert evaluated["metrics"]["bleu"] == pytest.approx(val["eval/bleu"], abs=1e-9)


# The bag-of-words baseline -------------------------------------------------------------------


def test_bow_baseline_separates_a_separable_set(tmp_path):
    from benchmarks.bow_baseline import TfIdf, bow_baseline, fit_logistic

    for split, n, seed in (("train", 60, 0), ("dev", 20, 1), ("test", 20, 2)):
        (tmp_path / f"{split}.txt").write_text(_labelled(n, seed))
    paths = [tmp_path / f"{s}.txt" for s in ("train", "dev", "test")]
    r = bow_baseline(*paths)
    assert r["dev_accuracy"] == 1.0 and r["test_accuracy"] == 1.0
    # The sparse products and the gradient step agree with dense float64 NumPy.
    texts = ["good great", "bad dull bad", "fine"]
    x = TfIdf.fit(texts).transform(texts)
    dense = np.zeros(x.shape)
    np.add.at(dense, (x.rows, x.indices), x.data)
    np.testing.assert_allclose(np.linalg.norm(dense, axis=1), 1.0)
    w = np.random.default_rng(0).normal(size=(x.shape[1], 2))
    np.testing.assert_allclose(x.matmul(w), dense @ w, rtol=1e-12)
    r_ = np.random.default_rng(1).normal(size=(3, 2))
    np.testing.assert_allclose(x.rmatmul(r_), dense.T @ r_, rtol=1e-12)
    w, b = fit_logistic(x, np.array([1, 0, 1]), 2, penalty=1e-2, steps=2000)
    z = dense @ w + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = dense.T @ (p - np.eye(2)[[1, 0, 1]]) / 3 + 1e-2 * w  # zero at the optimum
    np.testing.assert_allclose(grad, 0.0, atol=1e-8)
