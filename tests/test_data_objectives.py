"""Objectives' batch builders: CLM shift, MLM / NSP / SOP statistics, T5 span corruption,
seq2seq and classification batches."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llm_jax.data import DataConfig, load_source, train_tokenizer
from llm_jax.data import objectives as obj
from llm_jax.data.objectives import OBJECTIVES, ObjectiveSpec, objective_spec
from llm_jax.data.packing import row_pieces

# Binomial tolerances: 5 standard deviations, so a correct builder fails ~never.
SIGMAS = 5


def _tol(p, n):
    return SIGMAS * np.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def tok(shakespeare):
    return train_tokenizer(shakespeare, model_type="unigram", vocab_size=1000, num_sentinels=100)


def _cfg(path, token_cache, **kw):
    base = dict(paths=(str(path),), doc_split="blank_line", seq_len=128, batch_size=8)
    return DataConfig(**{**base, "cache_dir": token_cache, **kw})


# CLM ------------------------------------------------------------------------------------------


def test_clm_batch_literal():
    rows = np.array([[2, 10, 11, 3, 2, 12, 3, 0]])
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    pos = np.array([[0, 1, 2, 3, 0, 1, 2, 0]])
    b = obj.clm_batch(rows, seg, pos)
    np.testing.assert_array_equal(b["tokens"], [[2, 10, 11, 3, 2, 12, 3]])
    np.testing.assert_array_equal(b["targets"], [[10, 11, 3, 2, 12, 3, 0]])
    # No target across the document boundary (3 -> 2) or into padding (3 -> 0).
    np.testing.assert_array_equal(b["weights"], [[1, 1, 1, 0, 1, 1, 0]])
    np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 3, 0, 1, 2]])


def test_example_rng_is_a_pure_function():
    a = obj.example_rng(3, obj.STREAM_MLM, 1, 42).random(5)
    np.testing.assert_array_equal(a, obj.example_rng(3, obj.STREAM_MLM, 1, 42).random(5))
    assert not np.array_equal(a, obj.example_rng(3, obj.STREAM_MLM, 2, 42).random(5))
    assert not np.array_equal(a, obj.example_rng(3, obj.STREAM_PAIR, 1, 42).random(5))


# MLM ------------------------------------------------------------------------------------------


def test_mlm_mask_statistics(tok, shakespeare):
    tokens = np.asarray(tok.encode(shakespeare.read_text(encoding="utf-8")), np.int32)
    special = tok.all_special_ids
    # Sprinkle special tokens in: they must never be selected.
    tokens[::17] = tok.cls_id
    candidates = ~np.isin(tokens, special)
    random_ids = obj.ordinary_ids(tok.vocab_size, special)
    masked, w = obj.mlm_mask(
        tokens, candidates, np.random.default_rng(0), mask_id=tok.mask_id, random_ids=random_ids
    )
    sel = w > 0
    n, k = int(candidates.sum()), int(sel.sum())
    assert abs(k / n - 0.15) < _tol(0.15, n)
    assert not sel[~candidates].any()
    np.testing.assert_array_equal(masked[~sel], tokens[~sel])  # unselected untouched
    is_mask = masked[sel] == tok.mask_id
    kept = masked[sel] == tokens[sel]
    rand = ~is_mask & ~kept
    assert abs(is_mask.mean() - 0.8) < _tol(0.8, k)
    # A random draw equal to the original counts as "kept": ~1/V of the 10%.
    assert abs(rand.mean() - 0.1) < _tol(0.1, k) + 0.1 / 500
    assert abs(kept.mean() - 0.1) < _tol(0.1, k) + 0.1 / 500
    assert not np.isin(masked[sel][rand], special).any()


def test_mlm_pipeline_masks_only_ordinary_tokens(shakespeare, tok, token_cache):
    src = load_source(_cfg(shakespeare, token_cache, objective="mlm"), tok)
    b = src.build(np.arange(src.num_examples), 0)
    seg, w, tgt, inp = b["segment_ids"], b["weights"], b["targets"], b["tokens"]
    special = np.isin(tgt, tok.all_special_ids) | (seg == 0)
    assert not w[special].any()
    np.testing.assert_array_equal(inp[special], tgt[special])
    # Every packed segment is [CLS] ... [SEP].
    starts = b["positions"] == 0
    assert (tgt[starts & (seg > 0)] == tok.cls_id).all()
    n = int((~special).sum())
    assert abs(w.sum() / n - 0.15) < _tol(0.15, n)
    assert (b["token_type_ids"] == 0).all()


@pytest.mark.parametrize("dynamic", [False, True])
def test_static_and_dynamic_masking(shakespeare, tok, token_cache, dynamic):
    src = load_source(_cfg(shakespeare, token_cache, objective="mlm", dynamic_masking=dynamic), tok)
    idx = np.arange(64)
    e0, again, e1 = src.build(idx, 0), src.build(idx, 0), src.build(idx, 1)
    np.testing.assert_array_equal(e0["tokens"], again["tokens"])
    np.testing.assert_array_equal(e0["targets"], e1["targets"])
    # BERT (static) masks an example the same way every epoch; RoBERTa (dynamic) does not.
    assert np.array_equal(e0["weights"], e1["weights"]) == (not dynamic)
    # The mask of an example does not depend on which batch it is built in.
    solo = src.build(idx[5:6], 0)
    np.testing.assert_array_equal(solo["tokens"][0], e0["tokens"][5])


# NSP / SOP ------------------------------------------------------------------------------------


def _segments(row_tokens, types, seg, sep_id):
    real = row_tokens[seg > 0]
    t = types[seg > 0]
    a = real[1 : int(np.argmax(real == sep_id))]
    b = real[t == 1][:-1]
    return a, b


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_sentence_pair_statistics(shakespeare, tok, token_cache, task):
    src = load_source(_cfg(shakespeare, token_cache, objective="mlm", pair_task=task), tok)
    idx = np.arange(src.num_examples)
    labels = []
    for epoch in range(3):  # dynamic: new coin flips each epoch
        b = src.build(idx, epoch)
        labels.append(b["nsp_labels"])
        for i in range(0, len(idx), 7):
            tokens, types, seg = b["targets"][i], b["token_type_ids"][i], b["segment_ids"][i]
            n = int((seg > 0).sum())
            assert tokens[0] == tok.cls_id and tokens[n - 1] == tok.sep_id
            assert (tokens[n:] == 0).all() and (types[n:] == 0).all()
            a, bb = _segments(tokens, types, seg, tok.sep_id)
            lo_a, hi_a, lo_b, hi_b = src.examples[i]
            real_a, real_b = src._span(lo_a, hi_a), src._span(lo_b, hi_b)
            label = b["nsp_labels"][i]
            if label == 0:  # in order, B really follows A (up to truncation)
                np.testing.assert_array_equal(a, real_a[: len(a)])
                np.testing.assert_array_equal(bb, real_b[: len(bb)])
            elif task == "sop":  # swapped
                np.testing.assert_array_equal(a, real_b[: len(a)])
                np.testing.assert_array_equal(bb, real_a[: len(bb)])
            else:  # a random segment from elsewhere
                np.testing.assert_array_equal(a, real_a[: len(a)])
                assert not np.array_equal(bb, real_b[: len(bb)])
            # Masking never touches [CLS] / [SEP].
            specials = np.isin(tokens, [tok.cls_id, tok.sep_id]) | (seg == 0)
            assert not b["weights"][i][specials].any()
    labels = np.concatenate(labels)
    assert abs(labels.mean() - 0.5) < _tol(0.5, len(labels))


# T5 span corruption ---------------------------------------------------------------------------


def test_t5_random_spans_helper_numbers():
    # T5's published setting: 512 input tokens come from 568 raw tokens, 114 targets.
    assert obj.span_corruption_raw_length(512) == (568, 114)
    assert obj.span_corruption_lengths(568) == (512, 114)


@given(
    length=st.integers(2, 700),
    seed=st.integers(0, 2**31 - 1),
    density=st.sampled_from([0.15, 0.3, 0.5]),
    mean=st.sampled_from([1.0, 3.0, 8.0]),
)
def test_span_corruption_reconstructs_the_original(length, seed, density, mean):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 900, size=length).astype(np.int32)
    noise = obj.random_spans_noise_mask(length, density, mean, rng)
    assert not noise[0] and noise[-1]  # starts with kept tokens, ends with a noise span
    sentinels = 5000 - np.arange(700)  # enough for every span at these lengths
    inputs, targets = obj.span_corrupt(tokens, noise, sentinels)
    want_in, want_tgt = obj.span_corruption_lengths(length, density, mean)
    assert (len(inputs) + 1, len(targets) + 1) == (want_in, want_tgt)
    starts = np.flatnonzero(noise & ~np.concatenate([[False], noise[:-1]]))
    # Sentinels count down from the last id in order of appearance, in both sequences.
    np.testing.assert_array_equal(inputs[np.isin(inputs, sentinels)], sentinels[: len(starts)])
    np.testing.assert_array_equal(targets[np.isin(targets, sentinels)], sentinels[: len(starts)])
    back = obj.reconstruct_span_corruption(
        np.append(inputs, 1), np.append(targets, 1), sentinels, eos_id=1
    )
    np.testing.assert_array_equal(back, tokens)


def test_span_corruption_density_and_mean_span():
    noise_total = spans_total = tokens_total = 0
    span_lengths = []
    for seed in range(400):
        rng = np.random.default_rng(seed)
        noise = obj.random_spans_noise_mask(568, 0.15, 3.0, rng)
        edges = np.diff(np.concatenate([[0], noise.astype(int), [0]]))
        lengths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
        span_lengths.extend(lengths.tolist())
        noise_total += int(noise.sum())
        spans_total += len(lengths)
        tokens_total += len(noise)
    assert abs(noise_total / tokens_total - 0.15) < 0.005
    assert abs(noise_total / spans_total - 3.0) < 0.1
    # Span lengths are random (T5's uniform segmentation), not all equal to the mean.
    assert np.std(span_lengths) > 1 and min(span_lengths) == 1


def test_span_corruption_needs_a_sentinel_per_span(shakespeare, tok, token_cache):
    cfg = _cfg(shakespeare, token_cache, objective="span_corruption", seq_len=2048)
    with pytest.raises(ValueError, match=r"makes \d+ noise spans but the tokenizer has 100"):
        load_source(cfg, tok)


def test_span_corruption_pipeline_rows_reconstruct(shakespeare, tok, token_cache):
    src = load_source(_cfg(shakespeare, token_cache, objective="span_corruption"), tok)
    assert src.S == obj.span_corruption_raw_length(128)[1]
    idx = np.arange(40)
    b = src.build(idx, 0)
    pid, brow, seg = row_pieces(src.layout, idx)
    for p, r, s in zip(pid, brow, seg, strict=True):
        enc = b["encoder_tokens"][r][b["encoder_segment_ids"][r] == s]
        dec = b["decoder_targets"][r][b["decoder_segment_ids"][r] == s]
        assert enc[-1] == tok.eos_id and dec[-1] == tok.eos_id
        start, n = src.pieces.start[p], src.pieces.length[p]
        back = obj.reconstruct_span_corruption(enc, dec, tok.sentinel_ids, tok.eos_id)
        np.testing.assert_array_equal(back, src.stream[start : start + n])
    np.testing.assert_array_equal(
        b["decoder_tokens"], obj.shift_right(b["decoder_targets"], b["decoder_segment_ids"])
    )
    np.testing.assert_array_equal(b["decoder_weights"], b["decoder_segment_ids"] > 0)
    # Noise is redrawn each epoch (dynamic) but the packing, hence the shapes, stay put.
    b1 = src.build(idx, 1)
    assert not np.array_equal(b1["encoder_tokens"], b["encoder_tokens"])
    np.testing.assert_array_equal(b1["encoder_segment_ids"], b["encoder_segment_ids"])


# Encoder-decoder pairs and classification -----------------------------------------------------


def test_shift_right_literal():
    targets = np.array([[5, 6, 1, 7, 1, 0]])
    seg = np.array([[1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(obj.shift_right(targets, seg), [[0, 5, 6, 0, 7, 0]])
    np.testing.assert_array_equal(obj.shift_right(targets), [[0, 5, 6, 1, 7, 1]])


@pytest.mark.parametrize("pack", [True, False])
def test_seq2seq_pairs_from_tsv(corpora, tmp_path, token_cache, pack):
    rows = (corpora / "bible-en-es.tsv").read_text(encoding="utf-8")
    rows = rows.splitlines()[:300]
    path = tmp_path / "pairs.tsv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    english = [r.split("\t")[1] for r in rows]
    spanish = [r.split("\t")[2] for r in rows]
    tk = train_tokenizer(texts=english + spanish, model_type="bpe", vocab_size=1200)
    cfg = DataConfig(
        paths=(str(path),), format="tsv", objective="seq2seq", source_column=1,
        target_column=2, seq_len=256, target_seq_len=256, batch_size=4, pack=pack,
        cache_dir=token_cache,
    )  # fmt: skip
    src = load_source(cfg, tk)
    idx = np.arange(src.num_examples)
    b = src.build(idx, 0)
    pid, brow, seg = row_pieces(src.layout, idx)
    assert sorted(pid.tolist()) == list(range(300))
    for p, r, s in zip(pid, brow, seg, strict=True):
        enc = b["encoder_tokens"][r][b["encoder_segment_ids"][r] == s]
        dec = b["decoder_targets"][r][b["decoder_segment_ids"][r] == s]
        assert enc[-1] == tk.eos_id and dec[-1] == tk.eos_id
        assert tk.decode(enc[:-1]) == english[p] and tk.decode(dec[:-1]) == spanish[p]
        dec_in = b["decoder_tokens"][r][b["decoder_segment_ids"][r] == s]
        np.testing.assert_array_equal(dec_in, np.concatenate([[0], dec[:-1]]))
    if pack:
        assert src.num_examples < 300 / 2


def test_classification_from_sentiment_file(shared_data, tok, token_cache):
    path = shared_data / "sentiment-pang-lee-200.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    cfg = DataConfig(
        paths=(str(path),), format="fasttext", objective="classification", seq_len=96,
        batch_size=4, cache_dir=token_cache,
    )  # fmt: skip
    src = load_source(cfg, tok)
    b = src.build(np.arange(200), 0)
    want = np.array([1 if line.startswith("__label__pos") else 0 for line in lines])
    np.testing.assert_array_equal(b["labels"], want)  # names sorted: neg = 0, pos = 1
    for i in range(0, 200, 13):
        n = int(b["segment_ids"][i].sum())
        row = b["tokens"][i]
        assert row[0] == tok.cls_id and row[n - 1] == tok.sep_id and (row[n:] == 0).all()
        assert (
            tok.decode(row[1 : n - 1])
            == lines[i].split(" ", 1)[1][: len(tok.decode(row[1 : n - 1]))]
        )
        np.testing.assert_array_equal(b["positions"][i, :n], np.arange(n))
    assert (b["token_type_ids"] == 0).all()
    flipped = load_source(cfg.replace(label_names=("pos", "neg")), tok)
    np.testing.assert_array_equal(flipped.labels, 1 - want)
    with pytest.raises(ValueError, match=r"labels \['pos'\] in the data are not in"):
        load_source(cfg.replace(label_names=("neg",)), tok)


def test_classification_text_pairs_from_tsv(tmp_path, tok, token_cache):
    path = tmp_path / "nli.tsv"
    path.write_text("yes\tA man sleeps.\tSomeone rests.\nno\tA cat runs.\tNothing moves.\n")
    cfg = DataConfig(
        paths=(str(path),), format="tsv", objective="classification", label_column=0,
        text_columns=(1, 2), seq_len=32, batch_size=2, cache_dir=token_cache,
    )  # fmt: skip
    b = load_source(cfg, tok).build(np.arange(2), 0)
    np.testing.assert_array_equal(b["labels"], [1, 0])
    row, types = b["tokens"][0], b["token_type_ids"][0]
    n = int(b["segment_ids"][0].sum())
    first_sep = int(np.argmax(row == tok.sep_id))
    assert tok.decode(row[1:first_sep]) == "A man sleeps."
    assert tok.decode(row[first_sep + 1 : n - 1]) == "Someone rests."
    assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1 : n] == 1).all()


# The registry ---------------------------------------------------------------------------------

# One small corpus per input format, usable by any objective that reads that format with the
# default DataConfig columns (tsv: text in columns 0 and 1; fastText: labelled lines), so a
# newly registered objective is exercised here without editing this file.
FORMATS = ("text", "tsv", "fasttext", "jsonl")
CASES = [(name, fmt) for name, spec in OBJECTIVES.items() for fmt in spec.formats]


@pytest.fixture(scope="module")
def format_files(corpora, shakespeare, tmp_path_factory):
    rows = (corpora / "bible-en-es.tsv").read_text(encoding="utf-8").splitlines()[:200]
    folder = tmp_path_factory.mktemp("formats")
    pairs = folder / "pairs.tsv"
    # Cells cut short enough to fit seq_len=128 untruncated.
    pairs.write_text(
        "".join("\t".join(c[:150] for c in r.split("\t")[1:3]) + "\n" for r in rows),
        encoding="utf-8",
    )
    # fastText lines: the English verse labelled by whether it mentions the LORD.
    labelled = folder / "labelled.txt"
    labelled.write_text(
        "".join(
            f"__label__{'lord' if 'LORD' in r else 'other'} {r.split(chr(9))[1][:150]}\n"
            for r in rows
        ),
        encoding="utf-8",
    )
    # JSON Lines prompt-response records (instruct).
    records = folder / "records.jsonl"
    records.write_text(
        (corpora / "instruct-en-es.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
    )
    return {"text": shakespeare, "tsv": pairs, "fasttext": labelled, "jsonl": records}


def test_registry_is_complete():
    from llm_jax.data import config as config_lib
    from llm_jax.train.losses import LOSSES

    assert list(OBJECTIVES) == [
        "clm",
        "mlm",
        "span_corruption",
        "seq2seq",
        "classification",
        "instruct",
    ]
    assert config_lib.OBJECTIVES == tuple(OBJECTIVES)
    assert set(LOSSES) == set(OBJECTIVES)
    for name, spec in OBJECTIVES.items():
        assert spec.name == name and isinstance(spec, ObjectiveSpec)
        assert config_lib.OBJECTIVE_FORMATS[name] == spec.formats
        assert set(spec.formats) <= set(FORMATS)
        assert spec.main_loss in spec.loss_weights
    with pytest.raises(ValueError, match=r"unknown objective 'gan'; choose one of \['clm'"):
        objective_spec("gan")


ROUND_TRIPS = [
    *[(name, fmt, {}) for name, fmt in CASES],
    ("mlm", "text", {"pair_task": "nsp"}),
]


@pytest.mark.parametrize(
    ("objective", "fmt", "extra"),
    ROUND_TRIPS,
    ids=[f"{o}-{f}" + "".join(f"-{k}={v}" for k, v in e.items()) for o, f, e in ROUND_TRIPS],
)
def test_every_objective_round_trips_through_load_source(
    format_files, tok, token_cache, objective, fmt, extra
):
    """Each registered spec reads its formats, and its batches hold the arrays the spec
    names: the token fields, the weights of its main loss (and of any other loss it has),
    with zero weight on the empty rows that pad a last validation batch."""
    spec = objective_spec(objective)
    cfg = _cfg(format_files[fmt], token_cache, objective=objective, format=fmt, **extra)
    src = load_source(cfg, tok)
    assert src.num_examples > 0
    b = src.build(np.concatenate([np.arange(min(src.num_examples, 6)), [-1, -1]]), 0)
    assert {k: (v.shape[1:], v.dtype) for k, v in b.items()} == {
        k: (s, np.dtype(d)) for k, (s, d) in src.row_spec().items()
    }
    assert set(spec.token_fields) <= set(b)
    assert spec.loss_weights[spec.main_loss] in b
    present = {k: w for k, w in spec.loss_weights.items() if w in b}
    if extra.get("pair_task"):
        assert present == dict(spec.loss_weights)
    for w in present.values():
        weights = b[w]
        assert weights.dtype == np.float32 and weights[:-2].sum() > 0
        assert not weights[-2:].any()
        if weights.ndim == 1:  # row weights: 1 exactly on real rows
            np.testing.assert_array_equal(weights, b["segment_ids"][:, 0] > 0)
    assert all(b[f][-2:].sum() == 0 for f in spec.token_fields)
