"""ELMo: the LSTM cell, char CNN and highway against float64 twins, the LSTM layer against
torch.nn.LSTM, the backward LM's reading order on padded batches, the LM targets, long
words, configs, and a tiny run end to end (train, resume, load, embed) through the CLI."""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llm_jax.cli import main
from llm_jax.models import elmo
from llm_jax.models import elmo_train as et
from llm_jax.ops import lstm as lstm_ops
from tests import test_train_process as proc_helpers
from tests.reference.elmo_ref import (
    char_cnn_ref,
    highway_ref,
    lstm_cell_ref,
    lstm_layer_ref,
    scalar_mix_ref,
)

REPO = Path(__file__).resolve().parents[1]


def _close(actual, desired, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol)


def _lstm_weights(rng, d, c, p):
    return (
        rng.normal(0, 0.5, (d, 4 * c)).astype(np.float32),
        rng.normal(0, 0.5, (p, 4 * c)).astype(np.float32),
        rng.normal(0, 0.5, (4 * c,)).astype(np.float32),
        rng.normal(0, 0.5, (c, p)).astype(np.float32),
    )


def test_lstm_cell_with_clipping_and_projection_matches_twin():
    rng = np.random.default_rng(0)
    b, d, c, p = 3, 5, 6, 4
    x = rng.normal(0, 2, (b, d)).astype(np.float32)
    h = rng.normal(0, 1, (b, p)).astype(np.float32)
    mem = rng.normal(0, 2, (b, c)).astype(np.float32)
    w_x, w_h, bias, w_p = _lstm_weights(rng, d, c, p)
    for w, clips in ((None, (None, None)), (w_p, (None, None)), (w_p, (0.5, 0.3))):
        got = lstm_ops.lstm_cell(
            x, h, mem, w_x, w_h, bias, w, cell_clip=clips[0], proj_clip=clips[1]
        )
        want = lstm_cell_ref(x, h, mem, w_x, w_h, bias, w, *clips)
        _close(got[0], want[0])
        _close(got[1], want[1])
    # The clipped case really clips: some memory and outputs sit on the bounds.
    assert np.isclose(np.abs(want[1]), 0.5).any() and np.isclose(np.abs(want[0]), 0.3).any()


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_layer_with_padding_matches_twin(reverse):
    rng = np.random.default_rng(1)
    b, t, d, c, p = 3, 5, 4, 3, 2
    x = rng.normal(0, 1, (b, t, d)).astype(np.float32)
    mask = np.array(
        [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], bool
    )  # full, right-padded, left-padded
    w_x, w_h, bias, w_p = _lstm_weights(rng, d, c, p)
    got, _ = lstm_ops.lstm_layer(
        x, mask, w_x, w_h, bias, w_p, cell_clip=1.0, proj_clip=0.5, reverse=reverse
    )
    _close(got, lstm_layer_ref(x, mask, w_x, w_h, bias, w_p, 1.0, 0.5, reverse=reverse))


def test_char_cnn_and_highway_match_twin():
    rng = np.random.default_rng(2)
    chars = rng.normal(0, 1, (2, 3, 6, 4)).astype(np.float32)
    kernels = [rng.normal(0, 0.5, (k, 4, n)).astype(np.float32) for k, n in ((1, 2), (3, 3))]
    biases = [rng.normal(0, 0.5, (n,)).astype(np.float32) for n in (2, 3)]
    for act in ("relu", "tanh"):
        _close(
            lstm_ops.char_cnn(chars, kernels, biases, activation=act),
            char_cnn_ref(chars, kernels, biases, act),
        )
    x = rng.normal(0, 1, (2, 3, 5)).astype(np.float32)
    w = rng.normal(0, 0.5, (2, 5, 10)).astype(np.float32)
    hb = rng.normal(0, 0.5, (2, 10)).astype(np.float32)
    _close(lstm_ops.highway(x, w, hb), highway_ref(x, w, hb))


def test_scalar_mix_matches_twin():
    rng = np.random.default_rng(3)
    layers = rng.normal(0, 1, (3, 2, 4, 6)).astype(np.float32)
    weights = np.array([0.3, -1.0, 2.0], np.float32)
    _close(
        lstm_ops.scalar_mix(layers, weights, jnp.float32(1.7)), scalar_mix_ref(layers, weights, 1.7)
    )


def test_lstm_layer_matches_torch_both_directions():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    b, t, d, c = 2, 6, 4, 5
    ref = torch.nn.LSTM(d, c, batch_first=True)
    x = torch.randn(b, t, d)
    lengths = [6, 4]
    mask = np.arange(t)[None] < np.asarray(lengths)[:, None]  # right padding
    w_x = ref.weight_ih_l0.detach().numpy().T
    w_h = ref.weight_hh_l0.detach().numpy().T
    bias = (ref.bias_ih_l0 + ref.bias_hh_l0).detach().numpy()
    xn = x.numpy()
    fwd, _ = lstm_ops.lstm_layer(xn, mask, w_x, w_h, bias)
    bwd, _ = lstm_ops.lstm_layer(xn, mask, w_x, w_h, bias, reverse=True)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            want, _ = ref(x[i : i + 1, :n])
            _close(np.asarray(fwd)[i, :n], want[0].numpy())
            # The backward scan is torch's LSTM over the row reversed within its length.
            want_rev, _ = ref(torch.flip(x[i : i + 1, :n], dims=[1]))
            _close(np.asarray(bwd)[i, :n], torch.flip(want_rev, dims=[1])[0].numpy())
            assert not np.asarray(fwd)[i, n:].any() and not np.asarray(bwd)[i, n:].any()


TINY = elmo.ElmoConfig(
    vocab_size=30,
    max_chars=10,
    char_embed_dim=4,
    filters=((1, 4), (2, 4), (3, 8)),
    num_layers=2,
    cell_dim=12,
    proj_dim=8,
)


def test_backward_lm_reads_right_to_left_on_left_and_right_padding():
    model = elmo.build(TINY, seed=0)
    words = ["<S>", "the", "cat", "sat", "</S>"]
    n, t = len(words), 8
    alone, _ = elmo.encode_chars([words], TINY.max_chars)
    right, right_mask = elmo.encode_chars([words, ["<S>", "dog", "</S>"]], TINY.max_chars, t)
    left = np.zeros_like(right)
    left[0, t - n :] = right[0, :n]
    left_mask = np.zeros_like(right_mask)
    left_mask[0, t - n :] = True
    left_mask[1] = right_mask[1]
    left[1] = right[1]
    # Garbage characters on padding positions must not leak into anything.
    right[0, n:] = 7
    left[0, : t - n] = 9
    embed = jax.jit(lambda c, m: model.embed(c, m))
    want = np.asarray(embed(alone, np.ones((1, n), bool)))[:, 0]
    _close(np.asarray(embed(right, right_mask))[:, 0, :n], want, rtol=1e-5)
    _close(np.asarray(embed(left, left_mask))[:, 0, t - n :], want, rtol=1e-5)
    # Reading order: changing "the" changes the forward states after it and the backward
    # states before it only.
    changed, _ = elmo.encode_chars([["<S>", "a", "cat", "sat", "</S>"]], TINY.max_chars)
    other = np.asarray(embed(changed, np.ones((1, n), bool)))[:, 0]
    d = TINY.proj_dim
    for layer in (1, 2):
        np.testing.assert_array_equal(other[layer, 2:, d:], want[layer, 2:, d:])  # bwd after
        np.testing.assert_array_equal(other[layer, :1, :d], want[layer, :1, :d])  # fwd before
        assert not np.allclose(other[layer, 0, d:], want[layer, 0, d:])  # bwd before changes
        assert not np.allclose(other[layer, 4, :d], want[layer, 4, :d])  # fwd after changes


def test_dropout_only_in_training_and_rate_zero_is_the_plain_model():
    words = [["<S>", "the", "cat", "sat", "</S>"], ["<S>", "a", "dog", "</S>"]]
    chars, mask = elmo.encode_chars(words, TINY.max_chars)
    targets = jnp.asarray(np.arange(chars.shape[0] * chars.shape[1]).reshape(mask.shape) % 30)
    plain = elmo.build(TINY, seed=3)
    drop = elmo.build(TINY.replace(dropout_rate=0.1), seed=3)  # the same parameters
    losses = jax.jit(lambda m, key: m.lm_losses(chars, targets, mask, key))

    def values(x):
        return [np.asarray(v) for v in jax.tree.leaves(x)]

    # Today's model, composed by hand from its parts (no dropout anywhere).
    x = plain.chars(chars) * mask[..., None]
    fwd, bwd = x, x
    for i, (f, b) in enumerate(zip(plain.forward_layers, plain.backward_layers, strict=True)):
        skip = i > 0
        fwd = f(fwd, mask, reverse=False) + (fwd if skip else 0)
        bwd = b(bwd, mask, reverse=True) + (bwd if skip else 0)
    w, bias = plain.softmax_w[...], plain.softmax_b[...]
    want = elmo.lm_losses(fwd @ w + bias, bwd @ w + bias, targets, mask)
    key = jax.random.key(7)
    # Rate 0 with a key (training), and rate 0.1 without one (evaluation), are exactly that
    # model: the same compiled-program result bit for bit, and the hand-made one's.
    zero_rate = values(losses(plain, key))
    np.testing.assert_array_equal(values(losses(drop, None)), zero_rate)
    for a, b in zip(zero_rate, values(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6)
    # In training the key decides the masks: the same key, the same loss; another, another.
    trained = values(losses(drop, key))
    np.testing.assert_array_equal(trained, values(losses(drop, jax.random.key(7))))
    assert not np.allclose(trained, values(losses(drop, None)))
    assert not np.allclose(trained, values(losses(drop, jax.random.key(8))))
    with pytest.raises(ValueError, match="dropout_rate"):
        elmo.ElmoConfig(dropout_rate=1.0)


def test_elmo_is_exported_from_llm_jax_models():
    import llm_jax.models as models

    assert (models.Elmo, models.ElmoConfig, models.ScalarMix) == (
        elmo.Elmo,
        elmo.ElmoConfig,
        elmo.ScalarMix,
    )
    assert {"Elmo", "ElmoConfig", "ScalarMix"} <= set(models.__all__)


def test_lm_targets_are_next_and_previous_word():
    words = jnp.array([[3, 4, 5, 0], [0, 6, 7, 8]])  # right- and left-padded
    mask = jnp.array([[1, 1, 1, 0], [0, 1, 1, 1]], bool)
    big = 50.0
    # Logits that put all mass on the right word: forward on word t+1, backward on t-1.
    nxt = jnp.array([[4, 5, 0, 0], [0, 7, 8, 0]])
    prv = jnp.array([[0, 3, 4, 0], [0, 0, 6, 7]])
    losses = elmo.lm_losses(
        jax.nn.one_hot(nxt, 10) * big, jax.nn.one_hot(prv, 10) * big, words, mask
    )
    for name in ("forward", "backward"):
        total, count = losses[name]
        assert float(count) == 4.0  # 2 pairs per row
        assert float(total) < 1e-10
    wrong = elmo.lm_losses(
        jax.nn.one_hot(prv, 10) * big, jax.nn.one_hot(nxt, 10) * big, words, mask
    )
    assert float(wrong["forward"][0]) > 100


def test_long_words_are_truncated_with_a_warning():
    word = "antidisestablishment"
    with pytest.warns(UserWarning, match=r"1 word\(s\) longer than max_chars - 2 = 8 bytes"):
        chars, mask = elmo.encode_chars([["<S>", word, "ok"]], 10)
    want = [elmo.BOW_CHAR, *(b + 1 for b in word[:8].encode()), elmo.EOW_CHAR]
    assert chars[0, 1].tolist() == want
    assert chars[0, 0, :3].tolist() == [elmo.BOW_CHAR, elmo.BOS_CHAR, elmo.EOW_CHAR]
    assert (
        chars[0, 2].tolist()
        == [elmo.BOW_CHAR, ord("o") + 1, ord("k") + 1, elmo.EOW_CHAR] + [elmo.PAD_CHAR] * 6
    )
    assert mask.tolist() == [[True, True, True]]


def test_bad_configs_and_inputs_name_the_fix():
    with pytest.raises(ValueError, match=r"filters has width 7 > model.max_chars=5"):
        elmo.ElmoConfig(max_chars=5)
    with pytest.raises(ValueError, match=r"\[width, count\] pairs"):
        elmo.ElmoConfig(filters=((1, 0),))
    with pytest.raises(ValueError, match="vocab_size=0"):
        elmo.build(elmo.ElmoConfig())
    model = elmo.build(TINY)
    with pytest.raises(ValueError, match=r"\[B, T, max_chars=10\]"):
        model.embed(jnp.zeros((1, 3, 7), jnp.int32), jnp.ones((1, 3), bool))


@pytest.mark.parametrize("name", ["elmo_tiny", "elmo_small"])
def test_elmo_configs_load_and_initialise(name, corpora, monkeypatch):
    monkeypatch.chdir(REPO)
    path = REPO / "configs" / f"{name}.yaml"
    assert et.is_elmo_config(path) and not et.is_elmo_config(REPO / "configs" / "tiny.yaml")
    cfg = et.load_run_config(path, [f"data.paths=[{corpora / 'shakespeare.txt'}]"])
    model_cfg = cfg.model.replace(vocab_size=1000)
    model = nnx.eval_shape(lambda: elmo.Elmo(model_cfg, rngs=nnx.Rngs(0)))
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if name == "elmo_small":  # the published small model's char CNN and LSTM sizes
        assert cfg.model.num_filters == 2048
        assert shapes["forward_layers"][0]["w_x"].shape == (128, 4096)
        assert shapes["forward_layers"][0]["w_p"].shape == (1024, 128)
        assert shapes["chars"]["highway_w"].shape == (1, 2048, 4096)
        # AllenNLP lists the small ELMo at 13.6M parameters (its sampled softmax aside).
        softmax = shapes.pop("softmax_w").size + shapes.pop("softmax_b").size
        assert softmax == 128 * 1000 + 1000
        assert sum(x.size for x in jax.tree.leaves(shapes)) == 13_593_312


def _tiny_run_config(corpora, tmp_path) -> tuple[Path, list[str]]:
    """configs/elmo_tiny.yaml and overrides that make it a seconds-long run on 600 lines."""
    text = (corpora / "shakespeare.txt").read_text().splitlines()[:600]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text))
    config = tmp_path / "elmo.yaml"
    config.write_text((REPO / "configs" / "elmo_tiny.yaml").read_text())
    return config, [
        f"data.paths=[{corpus}]",
        "model.filters=[[1, 8], [2, 8], [3, 16]]",
        "model.cell_dim=32",
        "model.num_layers=1",
        "model.proj_dim=16",
        "model.dropout_rate=0.1",  # its key is in the checkpoint: resume stays exact
        "data.batch_size=8",
        "data.seq_len=10",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=2",
        "train.checkpoint_every=2",
        "train.progress=false",
        "optimizer.warmup_steps=0",
    ]


def test_tiny_run_trains_resumes_loads_and_embeds(corpora, tmp_path, capsys):
    config, common = _tiny_run_config(corpora, tmp_path)
    run = tmp_path / "run"
    assert main(["train", str(config), f"workdir={run}", "train.steps=4", *common]) == 0
    assert "held-out perplexity: forward" in capsys.readouterr().out
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_rec] == [1, 2, 3, 4]
    assert all(r["train/forward_ppl"] > 1 and r["train/backward_ppl"] > 1 for r in train_rec)
    a, vocab = et.load(run)
    # Exact resume: without step 4's checkpoint the rerun restarts from step 2 and ends
    # where the uninterrupted run did.
    shutil.rmtree(run / "checkpoints" / "4")
    assert main(["train", str(config), f"workdir={run}", "train.steps=4", *common]) == 0
    assert "resuming from step 2" in capsys.readouterr().err
    b, _ = et.load(run)
    assert main(["train", str(config), f"workdir={run}", "train.steps=3", *common]) == 0
    assert "at step 4, train.steps=3: nothing to train" in capsys.readouterr().err
    for x, y in zip(
        jax.tree.leaves(nnx.state(a, nnx.Param)),
        jax.tree.leaves(nnx.state(b, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-6)
    assert vocab.words[:3] == (elmo.BOS, elmo.EOS, elmo.UNK) and a.config.vocab_size == len(vocab)
    layers, mask = et.embed_sentences(
        a, [["to", "be"], ["or", "not", "to", "be"]], batch_size=4, length=8
    )
    assert layers.shape == (2, 2, 8, 32) and mask.sum(1).tolist() == [4, 6]
    mix = elmo.ScalarMix(2)
    assert mix(jnp.swapaxes(layers, 0, 1)).shape == (2, 8, 32)


def test_corpus_rows_packed_and_a_sentence_a_row():
    vocab = et.build_vocab(Counter("a b a c".split()), 1, 10)
    assert vocab.words == (elmo.BOS, elmo.EOS, elmo.UNK, "a", "b", "c")
    sentences = [["a", "b"], ["c", "zebra"]]
    # types in order of appearance: <S> a b </S> c zebra -> 0 1 2 3 4 5
    packed = et.make_corpus(sentences, vocab, 4, 8, pack=True)
    assert packed.rows.tolist() == [[0, 1, 2, 3], [3, 0, 4, 5], [5, 3, -1, -1]]
    rows = et.make_corpus(sentences, vocab, 4, 8, pack=False)
    assert rows.rows.tolist() == [[0, 1, 2, 3], [0, 4, 5, 3]]
    assert rows.type_words.tolist() == [0, 3, 4, 1, 5, 2]  # zebra is <UNK> as a target
    batch = rows.batch(np.array([1]))
    assert batch["words"].tolist() == [[0, 5, 2, 1]] and batch["mask"].all()
    zebra = [elmo.BOW_CHAR, *(b + 1 for b in b"zebra"), elmo.EOW_CHAR]
    assert batch["chars"][0, 2, :7].tolist() == zebra


def test_sigterm_saves_the_current_step_and_resume_continues(corpora, tmp_path, capsys):
    """`llm-jax train ELMO_CONFIG` as a process: SIGTERM mid-run saves the step it reached
    (exit 143, as the Transformer loop); a rerun resumes from it."""
    config, common = _tiny_run_config(corpora, tmp_path)
    run = tmp_path / "run"
    args = ["train", str(config), f"workdir={run}", *common]
    long_run = [*args, "train.steps=100000", "train.checkpoint_every=100000"]
    with proc_helpers._Background(
        proc_helpers._cli(*long_run), tmp_path / "term.log", proc_helpers._env(devices=1)
    ) as child:
        metrics = run / "metrics.jsonl"
        child.wait_for(
            lambda: metrics.exists() and metrics.read_text().count("\n") >= 1,
            "the first metrics record",
        )
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(timeout=proc_helpers.TIMEOUT) == 128 + signal.SIGTERM, (
            child.output()[-4000:]
        )
        output = child.output()
    reached = max(_train_steps(run))
    assert f"received signal {int(signal.SIGTERM)}: saved step {reached}, exiting" in output
    assert "Traceback" not in output, output[-4000:]
    assert proc_helpers._steps(run) == [reached], output[-2000:]
    proc_helpers._assert_verifies(run, reached)

    assert main([*args, f"train.steps={reached + 2}"]) == 0
    assert f"resuming from step {reached}" in capsys.readouterr().err
    assert _train_steps(run) == list(range(1, reached + 3))
    assert proc_helpers._steps(run)[-1] == reached + 2


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(corpora, tmp_path, capsys):
    config, common = _tiny_run_config(corpora, tmp_path)
    run = tmp_path / "run"
    # Warmup makes step 1's learning rate 0 and step 2's 5e29: step 2's update overflows.
    explode = ["optimizer.learning_rate=1.0e+30", "optimizer.warmup_steps=2"]
    args = ["train", str(config), f"workdir={run}", *common, *explode]
    assert main([*args, "train.steps=10", "train.checkpoint_every=1"]) == 1
    err = capsys.readouterr().err
    assert "NonFiniteLossError" in err and "Lower optimizer.learning_rate" in err
    bad = int(re.search(r"non-finite loss .* at step (\d+)", err).group(1))
    assert 1 < bad < 10
    assert f"the last good checkpoint (step {bad - 1})" in err
    assert proc_helpers._steps(run)[-1] == bad - 1  # nothing of the bad step was saved
    assert max(_train_steps(run)) == bad - 1
    model, _ = et.load(run)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def _train_steps(run: Path) -> list[int]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "train/loss" in r]
