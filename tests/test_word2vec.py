"""Word2Vec: ops vs float64 twins, the NumPy data side literally, training, file formats,
evaluation and bad input."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import ops
from llm_jax.cli import main
from llm_jax.eval.word_vectors import (
    WordVectors,
    analogies,
    load_word2vec,
    read_analogies,
    read_wordsim,
    save_word2vec,
    spearman,
    wordsim,
)
from llm_jax.models import word2vec as w2v
from llm_jax.parallel import make_mesh
from tests.reference.ops_ref import hierarchical_softmax_loss_ref, negative_sampling_loss_ref
from tests.reference.word2vec_ref import sgd_step_ref

SHAKESPEARE = Path(__file__).parent / "data" / "shakespeare.txt"


def _close(actual, desired, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------- ops


def test_negative_sampling_loss_matches_twin():
    rng = np.random.default_rng(0)
    h, rows = rng.normal(size=(6, 8)), rng.normal(size=(6, 4, 8))
    weights = (rng.random((6, 4)) > 0.2).astype(np.float32)
    weights[:, 0] = [1, 1, 1, 1, 1, 0]  # the last example is padding
    total, count = ops.negative_sampling_loss(
        jnp.asarray(h, jnp.float32), jnp.asarray(rows, jnp.float32), jnp.asarray(weights)
    )
    ref_total, ref_count = negative_sampling_loss_ref(h, rows, weights)
    _close(total, ref_total)
    _close(count, ref_count)


def test_hierarchical_softmax_loss_matches_twin():
    rng = np.random.default_rng(1)
    h, nodes = rng.normal(size=(5, 8)), rng.normal(size=(5, 3, 8))
    codes = rng.integers(0, 2, (5, 3))
    mask = np.asarray([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    total, count = ops.hierarchical_softmax_loss(
        jnp.asarray(h, jnp.float32), jnp.asarray(nodes, jnp.float32), jnp.asarray(codes), mask
    )
    ref_total, ref_count = hierarchical_softmax_loss_ref(h, nodes, codes, mask)
    _close(total, ref_total)
    assert float(count) == ref_count == 4.0


def test_negative_sampling_gradient_is_word2vec_update():
    # word2vec.c: g = (label - σ(h·r)); h moves by Σ g r, each row r by g h (times lr).
    rng = np.random.default_rng(2)
    h, rows = rng.normal(size=(1, 4)), rng.normal(size=(1, 3, 4))
    g_h, g_r = jax.grad(
        lambda h, r: ops.negative_sampling_loss(h, r, jnp.ones((1, 3)))[0], argnums=(0, 1)
    )(jnp.asarray(h, jnp.float32), jnp.asarray(rows, jnp.float32))
    sig = 1.0 / (1.0 + np.exp(-np.einsum("d,kd->k", h[0], rows[0])))
    g = np.asarray([1.0, 0.0, 0.0]) - sig
    _close(-np.asarray(g_h)[0], g @ rows[0])
    _close(-np.asarray(g_r)[0], g[:, None] * h[0][None, :])


# ------------------------------------------------------------------------ data side (NumPy)


def test_huffman_codes_and_points_literal():
    # Hand-run of word2vec.c's CreateBinaryTree on counts 5, 3, 2, 1: merges (1,2)->node 0,
    # (node0, 3)->node 1, (5, node1)->node 2 = root; the second of each merge gets bit 1.
    codes, points = w2v.huffman([5, 3, 2, 1])
    assert codes == [[0], [1, 1], [1, 0, 1], [1, 0, 0]]
    assert points == [[2], [2, 1], [2, 1, 0], [2, 1, 0]]
    c, p, m = w2v.padded_tree(np.asarray([5, 3, 2, 1]))
    assert c.shape == p.shape == m.shape == (4, 3)
    np.testing.assert_array_equal(m.sum(1), [1, 2, 3, 3])


def test_huffman_is_a_prefix_code_shorter_for_frequent_words():
    counts = sorted(Counter(SHAKESPEARE.read_text().split()).values(), reverse=True)[:300]
    codes, points = w2v.huffman(counts)
    strings = ["".join(map(str, c)) for c in codes]
    assert len(set(strings)) == len(strings)
    assert not any(a != b and b.startswith(a) for a in strings for b in strings[:50])
    assert len(codes[0]) <= len(codes[-1])
    assert math.isclose(sum(2.0 ** -len(c) for c in codes), 1.0)  # a full binary tree
    assert all(p[0] == len(counts) - 2 for p in points)  # the root is inner node V-2


def test_subsampling_probability_is_mikolovs_formula():
    counts = np.asarray([1000, 10, 1])
    t = 1e-3
    z = counts / 1011
    expected = [min((math.sqrt(zi / t) + 1) * t / zi, 1.0) for zi in z]
    _close(w2v.keep_probability(counts, t), expected, rtol=1e-12)
    assert expected[0] < 0.05 and expected[2] == 1.0
    np.testing.assert_array_equal(w2v.keep_probability(counts, 0.0), 1.0)


def test_noise_distribution_is_unigram_to_the_three_quarters():
    counts = np.asarray([16, 1, 81])
    p = np.diff(w2v.noise_cdf(counts, 0.75), prepend=0.0)
    _close(p, np.asarray([8, 1, 27]) / 36, rtol=1e-12)


def test_window_pairs_respect_reach_and_sentences():
    sent = np.asarray([0, 0, 0, 0, 1, 1])
    reach = np.asarray([2, 1, 2, 1, 2, 2])
    centres, contexts = w2v.window_pairs(sent, 0, 6, reach, window=2)
    got = sorted(zip(centres.tolist(), contexts.tolist(), strict=True))
    assert got == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 3), (3, 2), (4, 5), (5, 4)]
    c, ctx, mask = w2v.cbow_contexts(sent, 0, 6, reach, window=2)
    assert c.tolist() == [0, 1, 2, 3, 4, 5]
    assert mask.sum(1).tolist() == [2, 2, 3, 1, 1, 1]
    assert sorted(ctx[2][mask[2] > 0].tolist()) == [0, 1, 3]


def test_min_count_leaving_too_few_words_says_how_many_survive():
    with pytest.raises(ValueError, match=r"only 1 of the corpus's 3 distinct words .*min_count=3"):
        w2v.build_vocab(Counter({"a": 5, "b": 2, "c": 1}), 3)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match=r"word2vec\.model"):
        w2v.Word2VecConfig(model="glove")
    with pytest.raises(ValueError, match=r"word2vec\.min_alpha"):
        w2v.Word2VecConfig(alpha=0.01, min_alpha=0.1)


# ---------------------------------------------------------------------------------- training


@pytest.mark.parametrize(("model", "loss"), [("sg", "ns"), ("cbow", "hs"), ("sg", "hs")])
def test_training_lowers_the_loss(model, loss, tmp_path):
    # Lines of Shakespeare's words in one fixed order: the context predicts the centre word.
    words = list(dict.fromkeys(SHAKESPEARE.read_text().split()))[:40]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(" ".join(words) for _ in range(300)))
    cfg = w2v.Word2VecConfig(
        model=model, loss=loss, dim=16, epochs=3, batch=64, steps_per_call=4, sample=0.0
    )
    seen = []
    trained = w2v.train(cfg, [corpus], on_step=seen.append, log_every=1)
    assert trained.w_in.shape == (40, 16)
    assert trained.w_out.shape[0] == 40 - (loss == "hs")
    assert np.isfinite(trained.w_in).all()
    assert seen[-1].loss < 0.7 * seen[0].loss
    lrs = [p.lr for p in seen]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] >= np.float32(cfg.min_alpha)
    assert seen[-1].words_done == seen[-1].words_total == 3 * 300 * 40


# ----------------------------------------------------------------------------- file formats


def _toy_vectors() -> WordVectors:
    rng = np.random.default_rng(3)
    return WordVectors(("the", "king", "queen", "é"), rng.normal(size=(4, 5)).astype(np.float32))


def test_binary_format_round_trip_is_exact(tmp_path):
    wv = _toy_vectors()
    path = save_word2vec(wv, tmp_path / "v.bin", binary=True)
    assert path.read_bytes().startswith(b"4 5\nthe ")
    back = load_word2vec(path)
    assert back.words == wv.words
    np.testing.assert_array_equal(back.vectors, wv.vectors)


def test_text_format_round_trip(tmp_path):
    wv = _toy_vectors()
    back = load_word2vec(save_word2vec(wv, tmp_path / "v.txt", binary=False))
    assert back.words == wv.words
    np.testing.assert_allclose(back.vectors, wv.vectors, atol=1e-6)


def test_gensim_loads_our_files(tmp_path):
    keyed = pytest.importorskip("gensim.models").KeyedVectors
    wv = _toy_vectors()
    for binary in (True, False):
        path = save_word2vec(wv, tmp_path / f"v{int(binary)}", binary=binary)
        kv = keyed.load_word2vec_format(str(path), binary=binary)
        assert list(kv.index_to_key) == list(wv.words)
        np.testing.assert_allclose(kv.vectors, wv.vectors, atol=1e-6)


def test_cli_train_saves_formats_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["word2vec", "train", "--input", str(SHAKESPEARE), "--min-count", "3",
            "--dim", "8", "--epochs", "1", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    text, binary = load_word2vec(out / "vectors.txt"), load_word2vec(out / "vectors.bin")
    assert text.words == binary.words
    np.testing.assert_allclose(text.vectors, binary.vectors, atol=1e-6)
    model = w2v.Word2Vec.load(out)
    np.testing.assert_array_equal(model.w_in, binary.vectors)
    assert model.config.dim == 8 and model.vocab.words == binary.words
    assert (out / "checkpoints").is_dir() and (out / "metrics.jsonl").is_file()
    # Resuming a finished run restores its last checkpoint and trains no further.
    assert main([*args, "--resume"]) == 0
    np.testing.assert_array_equal(load_word2vec(out / "vectors.bin").vectors, binary.vectors)
    capsys.readouterr()
    assert main(["word2vec", "neighbours", str(out), "the", "zzzq", "--topn", "2"]) == 1
    printed = capsys.readouterr().out
    assert "# the" in printed and "not in the vocabulary" in printed and "zzzq" in printed


def test_cli_corpus_too_small_for_min_count(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c a\n")
    rc = main(["word2vec", "train", "--input", str(corpus), "--quiet", "--out", str(tmp_path)])
    assert rc == 2
    assert "only 0 of the corpus's 3 distinct words" in capsys.readouterr().err


# -------------------------------------------------------------------------------- evaluation


def test_spearman_literal():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties share the mean rank: ranks (1.5, 1.5, 3) vs (1, 2, 3) -> r = sqrt(3) / 2
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


def _analogy_vectors() -> WordVectors:
    words = ("man", "woman", "king", "queen", "apple", "Paris")
    vecs = np.asarray(
        [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1], [0, 0.1, 0, 1]],
        np.float32,
    )
    return WordVectors(words, vecs)


def test_analogies_and_wordsim_report_accuracy_and_oov(tmp_path):
    wv = _analogy_vectors()
    questions = tmp_path / "q.txt"
    questions.write_text(": royal\nman king woman queen\nMAN WOMAN KING QUEEN\nman king cat dog\n")
    result = analogies(wv, questions)
    assert result["royal"]["3cosadd"] == 1.0 and result["royal"]["3cosmul"] == 1.0
    assert result["total"]["questions"] == 3 and result["total"]["oov"] == pytest.approx(1 / 3)
    sims = tmp_path / "ws.tsv"
    sims.write_text("# comment\nking\tqueen\t9\nking\tapple\t1\nman\twoman\t10\ncat\tdog\t7\n")
    ws = wordsim(wv, sims)
    assert ws["oov"] == pytest.approx(0.25) and ws["spearman"] == pytest.approx(0.5)
    assert wv.nearest(["king", "woman"], ["man"], topn=1)[0][0] == "queen"
    with pytest.raises(KeyError, match="cat"):
        wv.nearest(["cat"])


def test_bad_evaluation_files_name_the_line(tmp_path):
    bad = tmp_path / "ws.tsv"
    bad.write_text("# header\nking\tqueen\t9\nking queen 9\n")
    with pytest.raises(ValueError, match=r"ws.tsv:3: expected 'word1<TAB>word2<TAB>score'"):
        read_wordsim(bad)
    bad_q = tmp_path / "q.txt"
    bad_q.write_text(": s\na b c d\na b c\n")
    with pytest.raises(ValueError, match=r"q.txt:3: expected four words"):
        read_analogies(bad_q)
    no_section = tmp_path / "n.txt"
    no_section.write_text("a b c d\n")
    with pytest.raises(ValueError, match=r"n.txt:1: expected a ': section' line first"):
        read_analogies(no_section)


# ------------------------------------------------------------------ sharding and resumption


def _tiny_corpus(tmp_path: Path) -> Path:
    words = SHAKESPEARE.read_text().split()[:3000]
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)))
    return corpus


def _tiny_config(**kw) -> w2v.Word2VecConfig:
    base = dict(dim=8, epochs=2, batch=32, steps_per_call=2, chunk_words=400, min_count=2)
    return w2v.Word2VecConfig(**{**base, **kw})


@pytest.mark.parametrize(("model", "loss"), [("sg", "ns"), ("cbow", "hs")])
def test_sharded_training_equals_single_device(model, loss, tmp_path):
    # The tables' rows split over 8 devices (padded to a multiple of 8), the batch
    # replicated: the same updates in the same order, so the same tables.
    corpus, cfg = _tiny_corpus(tmp_path), _tiny_config(model=model, loss=loss)
    single = w2v.train(cfg, [corpus])
    mesh = make_mesh()  # ('data', 'fsdp', 'tensor') = (8, 1, 1)
    sharded = w2v.train(cfg, [corpus], mesh=mesh)
    assert len(single.vocab) % 8 != 0  # the padding path is exercised
    assert sharded.w_in.shape == single.w_in.shape
    np.testing.assert_allclose(sharded.w_in, single.w_in, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sharded.w_out, single.w_out, rtol=1e-5, atol=1e-7)
    assert np.abs(single.w_out).max() > 0  # it trained


def test_sharded_step_moves_gathered_rows_not_tables():
    # Rows split 8 ways: each device holds [64 / 8, D] of each table, the only collective is
    # one all-reduce of the gathered rows ([P, 1, D] inputs, [P, K, D] outputs), and the
    # scatter-add is local; nothing of size [V, D] crosses devices.
    cfg = w2v.Word2VecConfig(dim=8, batch=4, steps_per_call=2)
    mesh = make_mesh()
    rows, _, shards = w2v._row_sharding(mesh)
    batch = {
        "inp": np.zeros((2, 4, 1), np.int32),
        "inp_mask": np.ones((2, 4, 1), np.float32),
        "out": np.zeros((2, 4, 6), np.int32),
        "out_mask": np.ones((2, 4, 6), np.float32),
    }
    with jax.set_mesh(mesh):
        table = jax.device_put(jnp.zeros((64, 8)), rows)
        lowered = w2v._compile_step(cfg, mesh).lower(table, table, None, batch, np.zeros(2))
        hlo = lowered.compile().as_text()
    assert shards == 8 and "entry_computation_layout={(f32[8,8]{1,0}, f32[8,8]{1,0}," in hlo
    kinds = r" (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\("
    collectives = [line for line in hlo.splitlines() if re.search(kinds, line)]
    assert len(collectives) == 1
    assert "(f32[4,1,8]{2,1,0}, f32[4,6,8]{2,1,0}) all-reduce(" in collectives[0]


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_training(tmp_path):
    corpus, cfg = _tiny_corpus(tmp_path), _tiny_config(chunk_words=150)
    whole = w2v.train(cfg, [corpus])

    def crash(p: w2v.Progress) -> None:
        if p.words_done >= 0.8 * p.words_total:  # in the second epoch, a few chunks in
            raise _Interrupt

    work = tmp_path / "run"
    with pytest.raises(_Interrupt):
        w2v.train(cfg, [corpus], workdir=work, checkpoint_every=2, on_step=crash, log_every=1)
    steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 4
    shutil.copytree(work / "checkpoints", tmp_path / "run8" / "checkpoints")  # for later
    seen = []
    resumed = w2v.train(
        cfg, [corpus], workdir=work, checkpoint_every=2, resume=True, on_step=seen.append
    )
    assert 0.5 * seen[0].words_total < seen[0].words_done < 0.8 * seen[0].words_total
    # Every draw is seeded by (seed, epoch, chunk) and the restored tables are the saved
    # bytes, so the resumed run computes exactly what the uninterrupted one did.
    np.testing.assert_array_equal(resumed.w_in, whole.w_in)
    np.testing.assert_array_equal(resumed.w_out, whole.w_out)
    # The interrupted run's checkpoint resumed on 8 devices (rows sharded): fp32-equal.
    on_mesh = w2v.train(cfg, [corpus], workdir=tmp_path / "run8", resume=True, mesh=make_mesh())
    np.testing.assert_allclose(on_mesh.w_in, whole.w_in, rtol=1e-5, atol=1e-7)
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records)


def test_resume_with_other_settings_names_them(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    w2v.train(_tiny_config(epochs=1), [corpus], workdir=tmp_path / "r", checkpoint_every=1)
    with pytest.raises(ValueError, match=r"word2vec window=5 \(now 3\).*without --resume"):
        w2v.train(_tiny_config(epochs=1, window=3), [corpus], workdir=tmp_path / "r", resume=True)
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text().replace("the", "thee"))
    with pytest.raises(ValueError, match=r"vocabulary .* differs .*same --input files"):
        w2v.train(_tiny_config(epochs=1), [other], workdir=tmp_path / "r", resume=True)


# ------------------------------------------------------------------- the update vs the twin


def _step(loss, w_in, w_out, tree, batch, lr):
    step = jax.jit(w2v._update, static_argnames="loss")
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    tree = None if tree is None else tuple(jnp.asarray(x) for x in tree)
    return step(jnp.asarray(w_in), jnp.asarray(w_out), tree, batch, jnp.float32(lr), loss=loss)


def test_negative_sampling_step_matches_word2vec_c_twin():
    # CBOW rows with 2, 1 and 0 (padding) contexts, repeated words so scatter-adds collide.
    rng = np.random.default_rng(4)
    w_in, w_out = rng.normal(size=(6, 4)) * 0.3, rng.normal(size=(6, 4)) * 0.3
    inp = np.asarray([[1, 2], [3, 0], [0, 0]], np.int32)
    inp_mask = np.asarray([[1, 1], [1, 0], [0, 0]], np.float32)
    out = np.asarray([[0, 5, 1], [4, 4, 1], [2, 3, 3]], np.int32)
    out_mask = np.asarray([[1, 1, 1], [1, 0, 1], [0, 0, 0]], np.float32)
    batch = dict(inp=inp, inp_mask=inp_mask, out=out, out_mask=out_mask)
    new_in, new_out, _, count = _step("ns", w_in, w_out, None, batch, 0.5)
    labels = np.asarray([[1, 0, 0]] * 3)
    ref_in, ref_out = sgd_step_ref(w_in, w_out, inp, inp_mask, out, labels, out_mask, 0.5)
    _close(new_in, ref_in)
    _close(new_out, ref_out)
    assert float(count) == 2.0


def test_hierarchical_softmax_step_matches_word2vec_c_twin():
    rng = np.random.default_rng(5)
    counts = np.asarray([5, 3, 2, 1])
    codes, points, mask = w2v.padded_tree(counts)
    w_in, w_out = rng.normal(size=(4, 4)) * 0.3, rng.normal(size=(3, 4)) * 0.3
    inp = np.asarray([[1], [2], [3], [0]], np.int32)
    inp_mask = np.asarray([[1], [1], [1], [0]], np.float32)
    target = np.asarray([2, 0, 3, 1], np.int32)  # the last is padding (weight 0)
    batch = dict(inp=inp, inp_mask=inp_mask, out=target, out_mask=inp_mask[:, 0])
    new_in, new_out, _, count = _step("hs", w_in, w_out, (codes, points, mask), batch, 0.5)
    weights = mask[target] * inp_mask
    ref_in, ref_out = sgd_step_ref(
        w_in, w_out, inp, inp_mask, points[target], 1 - codes[target], weights, 0.5
    )
    _close(new_in, ref_in)
    _close(new_out, ref_out)
    assert float(count) == 3.0


# ------------------------------------------------------------------------ bad input (CLI)


def test_cli_eval_and_queries_on_bad_input(tmp_path, capsys):
    vectors = save_word2vec(_analogy_vectors(), tmp_path / "v.bin", binary=True)
    questions = tmp_path / "q.txt"
    questions.write_text(": royal\nman king woman queen\n")
    bad_ws = tmp_path / "ws.tsv"
    bad_ws.write_text("king\tqueen\t9\nking\tqueen\tnine\n")
    rc = main(["word2vec", "eval", str(vectors), "--wordsim", str(bad_ws),
               "--analogies", str(questions)])  # fmt: skip
    assert rc == 2 and "ws.tsv:2: expected 'word1<TAB>word2<TAB>score'" in capsys.readouterr().err
    assert main(["word2vec", "analogy", str(vectors), "man", "king", "zebra"]) == 1
    assert "not in the vocabulary (6 words): zebra" in capsys.readouterr().out
    assert main(["word2vec", "analogy", str(vectors), "man", "king", "woman", "--topn", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("queen")
    assert main(["word2vec", "neighbours", str(tmp_path / "none.bin"), "king"]) == 2
    assert "none.bin" in capsys.readouterr().err


def test_empty_corpus_says_no_word_survives(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=r"only 0 of the corpus's 0 distinct words"):
        w2v.train(w2v.Word2VecConfig(), [empty])
