"""The pipeline: config, packing and document boundaries, resumption, host and mesh
sharding, splits, caching and the errors a user meets first."""

import json
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import llm_jax.ops as ops
from llm_jax.data import (
    DataConfig,
    InvalidUTF8Warning,
    batch_sharding,
    load_source,
    make_iterator,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def char_tok(shakespeare):
    return train_tokenizer(shakespeare, model_type="char", vocab_size=None)


@pytest.fixture(scope="module")
def sp_tok(shakespeare):
    return train_tokenizer(shakespeare, model_type="unigram", vocab_size=1000, num_sentinels=100)


def _cfg(path, token_cache, **kw):
    base = dict(paths=(str(path),), doc_split="blank_line", seq_len=64, batch_size=8)
    return DataConfig(**{**base, "cache_dir": token_cache, **kw})


# Config ---------------------------------------------------------------------------------------


def test_config_from_dict_and_errors():
    cfg = DataConfig.from_dict({"paths": "a.txt", "seq_len": 128, "validation_paths": ["v"]})
    assert cfg.paths == ("a.txt",) and cfg.validation_paths == ("v",)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown DataConfig keys \['seqlen'\].*'seq_len'"):
        DataConfig.from_dict({"seqlen": 128})
    with pytest.raises(ValueError, match=r"objective='gan' is not one of \['clm'"):
        DataConfig(objective="gan")
    with pytest.raises(ValueError, match=r"doc_split='para'.*'blank_line'"):
        DataConfig(doc_split="para")
    with pytest.raises(ValueError, match=r"mlm_probability=1.5 must be in \(0, 1\)"):
        DataConfig(objective="mlm", mlm_probability=1.5)
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        DataConfig(batch_size=0)
    with pytest.raises(ValueError, match="format='text' cannot feed objective='seq2seq'"):
        DataConfig(objective="seq2seq")
    with pytest.raises(ValueError, match="pair_task='nsp' needs objective='mlm'"):
        DataConfig(pair_task="nsp")
    with pytest.raises(ValueError, match="either validation_fraction or validation_paths"):
        DataConfig(validation_fraction=0.1, validation_paths=("v.txt",))
    with pytest.raises(ValueError, match="mask_token_fraction \\+ random_token_fraction"):
        DataConfig(mask_token_fraction=0.8, random_token_fraction=0.3)


# Packing and CLM --------------------------------------------------------------------------------


def test_packing_never_attends_across_documents(tmp_path, token_cache):
    """Synthetic corpus: document i is one repeated character unique to it, so a token's
    document is readable from the token itself."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 150, size=300)
    docs = [chr(0x4E00 + i) * int(n) for i, n in enumerate(lengths)]
    (tmp_path / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer(tmp_path / "docs.txt", model_type="char", vocab_size=None)
    doc_of = {tok.encode(d[0])[0]: i for i, d in enumerate(docs)}
    cfg = _cfg(tmp_path / "docs.txt", token_cache, doc_split="line", add_bos=False, add_eos=False)
    it = make_iterator(cfg, tok)
    total_weight = 0.0
    for _ in range(it.steps_per_epoch):
        b = next(it)
        mask = np.asarray(ops.segment_mask(b["segment_ids"]))[:, 0]  # [B, T, T]
        doc = np.vectorize(lambda t: doc_of.get(int(t), -1))(b["tokens"])
        real = b["segment_ids"] > 0
        same_doc = (doc[:, :, None] == doc[:, None, :]) & real[:, :, None] & real[:, None, :]
        same_segment = b["segment_ids"][:, :, None] == b["segment_ids"][:, None, :]
        # The mask allows exactly the pairs in one document (and one chunk of it).
        assert not (mask & ~same_doc).any()
        np.testing.assert_array_equal(mask, same_doc & same_segment)
        # Targets never cross a document either; padding has weight 0.
        w = b["weights"] > 0
        target_doc = np.vectorize(lambda t: doc_of.get(int(t), -1))(b["targets"])
        assert (target_doc[w] == doc[w]).all() and not w[~real].any()
        total_weight += b["weights"].sum()
    # Iterating drops the epoch's last partial batch; building every row shows that each
    # next-token pair of the corpus is trained on exactly once per epoch.
    pairs = int(sum(max(n - 1, 0) for n in lengths))
    assert total_weight <= pairs
    src = it.source
    all_rows = src.build(np.arange(src.num_examples), 0)
    assert all_rows["weights"].sum() == pairs


def test_clm_rows_on_real_text(shakespeare, char_tok, token_cache):
    cfg = _cfg(shakespeare, token_cache, seq_len=128)
    it = make_iterator(cfg, char_tok)
    docs = shakespeare.read_text(encoding="utf-8").split("\n\n")
    b = next(it)
    assert b["tokens"].shape == (8, 128) and b["tokens"].dtype == np.int32
    assert b["weights"].dtype == np.float32
    seg, pos, tok, tgt, w = (
        b[k] for k in ("segment_ids", "positions", "tokens", "targets", "weights")
    )
    for r in range(8):
        for s in np.unique(seg[r][seg[r] > 0]):
            where = np.flatnonzero(seg[r] == s)
            # A segment is contiguous, its positions restart at 0 and count up.
            np.testing.assert_array_equal(where, np.arange(where[0], where[-1] + 1))
            np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))
            ids = tok[r, where]
            text = char_tok.decode(ids, skip_special_tokens=True)
            assert any(text in d for d in docs)
            if ids[0] == char_tok.bos_id:
                assert any(d.startswith(text) for d in docs)
            # Next-token targets inside the segment, weight 0 only where the next token is
            # in another segment (or beyond the row).
            np.testing.assert_array_equal(tgt[r, where[:-1]], tok[r, where[1:]])
            assert (w[r, where[:-1]] == 1).all()
        assert (w[r][seg[r] == 0] == 0).all() and (tok[r][seg[r] == 0] == 0).all()


# Resumption -------------------------------------------------------------------------------------


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize(
    "objective, extra",
    [
        ("clm", {}),
        ("clm", {"num_workers": 2}),
        ("mlm", {"dynamic_masking": True}),
        ("span_corruption", {}),
    ],
)
def test_resume_mid_epoch_gives_identical_next_batches(
    shakespeare, sp_tok, token_cache, objective, extra
):
    cfg = _cfg(shakespeare, token_cache, seq_len=256, batch_size=32, objective=objective, **extra)
    it = make_iterator(cfg, sp_tok)
    spe = it.steps_per_epoch
    # Stop just before an epoch boundary so the continuation crosses into a reshuffle.
    for _ in range(spe - 2):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["epoch"] == 0 and state["position"] == spe - 2
    expected = [next(it) for _ in range(4)]
    assert it.get_state()["epoch"] == 1
    fresh = make_iterator(cfg, sp_tok)
    fresh.set_state(state)
    for want in expected:
        _same(next(fresh), want)
    # A new epoch is a new order.
    first = make_iterator(cfg, sp_tok)
    key = next(iter(expected[2]))
    assert not np.array_equal(next(first)[key], expected[2][key])


def test_set_state_rejects_a_different_order(shakespeare, char_tok, token_cache):
    it = make_iterator(_cfg(shakespeare, token_cache), char_tok)
    state = it.get_state()
    other = make_iterator(_cfg(shakespeare, token_cache, shuffle_seed=1), char_tok)
    with pytest.raises(ValueError, match="seed=0 but this iterator has 1"):
        other.set_state(state)


# Hosts and meshes -------------------------------------------------------------------------------


def test_two_hosts_get_disjoint_covering_shards(shakespeare, char_tok, token_cache):
    cfg = _cfg(shakespeare, token_cache, batch_size=8, seq_len=512)
    single = make_iterator(cfg, char_tok, process_index=0, process_count=1)
    hosts = [make_iterator(cfg, char_tok, process_index=p, process_count=2) for p in (0, 1)]
    seen: list[list[int]] = [[], []]
    for step in range(single.steps_per_epoch):
        whole = next(single)
        parts = [next(h) for h in hosts]
        ids = single.example_indices(step)
        for p in (0, 1):
            # Each host builds exactly its half of the global batch, nothing else.
            np.testing.assert_array_equal(hosts[p].example_indices(step), ids)
            mine = ids[4 * p : 4 * (p + 1)]
            _same(parts[p], single.source.build(mine, 0))
            seen[p].extend(mine.tolist())
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), whole[k])
    # Over an epoch: no example on both hosts or twice, and together they cover the epoch
    # (all examples but the < B left over by drop_remainder).
    both = seen[0] + seen[1]
    assert not set(seen[0]) & set(seen[1]) and len(set(both)) == len(both)
    n = single.source.num_examples
    assert set(both) <= set(range(n)) and n - len(both) < 8


def test_batches_land_on_the_mesh_data_axes(shakespeare, char_tok, token_cache):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    cfg = _cfg(shakespeare, token_cache, batch_size=16)
    it = make_iterator(cfg, char_tok, mesh=mesh)
    host = make_iterator(cfg, char_tok)
    b, want = next(it), next(host)
    for k, v in b.items():
        assert isinstance(v, jax.Array) and v.shape == want[k].shape
        assert v.sharding.is_equivalent_to(
            NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), v.ndim
        )
        np.testing.assert_array_equal(np.asarray(v), want[k])
    assert it.element_spec["tokens"].shape == (16, 64)
    assert batch_sharding(mesh).spec == PartitionSpec(("data", "fsdp"))
    # A DP-only mesh: the absent 'fsdp' axis is simply not used.
    dp = jax.make_mesh((8,), ("data",))
    assert batch_sharding(dp).spec == PartitionSpec(("data",))


def test_batch_not_dividing_the_mesh_errors(shakespeare, char_tok, token_cache):
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"batch_size=12 .* 8 data shards .* e\.g\. 8, 16, 24"):
        make_iterator(_cfg(shakespeare, token_cache, batch_size=12), char_tok, mesh=mesh)
    tp = jax.make_mesh((8,), ("tensor",))
    with pytest.raises(ValueError, match="none of the data axes"):
        make_iterator(_cfg(shakespeare, token_cache), char_tok, mesh=tp)
    with pytest.raises(ValueError, match="3 hosts"):
        make_iterator(_cfg(shakespeare, token_cache), char_tok, process_index=0, process_count=3)


# Corpus errors and warnings ---------------------------------------------------------------------


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path, char_tok, token_cache):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good line\nbad \xff byte and \xc3\x28 pair\n\nmore \x80 text\n")
    cfg = _cfg(bad, token_cache, seq_len=16, batch_size=1)
    for _ in range(2):  # the cache hit warns the same as the first read
        with pytest.warns(InvalidUTF8Warning, match=r"replaced 3 invalid UTF-8 .*bad\.txt \(3\)"):
            it = make_iterator(cfg, char_tok)
    text = char_tok.decode(it.source.build(np.array([0]), 0)["tokens"][0])
    assert "\ufffd" in text
    good = tmp_path / "good.txt"
    good.write_text("fine \ufffd already here\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InvalidUTF8Warning)
        make_iterator(_cfg(good, token_cache, seq_len=16, batch_size=1), char_tok)


def test_empty_or_missing_corpus_errors(tmp_path, char_tok, token_cache):
    with pytest.raises(ValueError, match=r"no such file or folder.*missing\.txt"):
        make_iterator(_cfg(tmp_path / "missing.txt", token_cache), char_tok)
    (tmp_path / "empty.txt").write_text(" \n\n\t\n")
    with pytest.raises(ValueError, match="holds no text"):
        make_iterator(_cfg(tmp_path / "empty.txt", token_cache), char_tok)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="has no files matching"):
        make_iterator(_cfg(tmp_path / "folder", token_cache), char_tok)
    with pytest.raises(ValueError, match=r"DataConfig\.paths is empty"):
        make_iterator(DataConfig(cache_dir=token_cache), char_tok)
    (tmp_path / "tiny.txt").write_text("just a few words\n")
    with pytest.raises(ValueError, match=r"1 example.*batch_size=8"):
        make_iterator(_cfg(tmp_path / "tiny.txt", token_cache), char_tok)


def test_folder_input_reads_every_file_once(tmp_path, char_tok, token_cache):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "sub" / "b.txt").write_text("beta\n")
    (root / ".hidden.txt").write_text("never\n")
    cfg = _cfg(root, token_cache, doc_split="file", seq_len=16, batch_size=2, pack=False)
    rows = next(make_iterator(cfg, char_tok))
    texts = [char_tok.decode(r, skip_special_tokens=True) for r in rows["tokens"]]
    assert "".join(texts).replace("\n", "") in ("alphabeta", "betaalpha")


# Splits and caching -----------------------------------------------------------------------------


def test_validation_fraction_is_disjoint_and_fixed(shakespeare, char_tok, token_cache):
    cfg = _cfg(shakespeare, token_cache, validation_fraction=0.1, seq_len=128)
    train = load_source(cfg, char_tok, "train")
    val = load_source(cfg, char_tok, "validation")

    def key(src):
        return {(int(s), int(n)) for s, n in zip(src.pieces.start, src.pieces.length, strict=True)}

    full = load_source(cfg.replace(validation_fraction=0.0), char_tok, "train")
    assert not key(train) & key(val) and key(train) | key(val) == key(full)
    assert abs(len(val.pieces) - 0.1 * len(full.pieces)) <= 1
    # The split does not move when the shuffle seed does.
    assert key(load_source(cfg.replace(shuffle_seed=5), char_tok, "validation")) == key(val)
    it = make_iterator(cfg, char_tok, split="validation")
    batches = list(it)
    assert len(batches) == len(it) == -(-val.num_examples // 8)
    # One ordered pass; the last batch is padded with empty rows (weight 0).
    assert sum(int((b["segment_ids"][:, 0] > 0).sum()) for b in batches) == val.num_examples
    with pytest.raises(ValueError, match="no validation data"):
        make_iterator(cfg.replace(validation_fraction=0.0), char_tok, split="validation")


def test_validation_paths(shakespeare, tmp_path, char_tok, token_cache):
    (tmp_path / "val.txt").write_text("Held-out text.\n\nAnother held-out paragraph.\n")
    cfg = _cfg(
        shakespeare, token_cache, validation_paths=(str(tmp_path / "val.txt"),), batch_size=4
    )
    b = next(make_iterator(cfg, char_tok, split="validation"))
    text = char_tok.decode(b["tokens"].reshape(-1), skip_special_tokens=True)
    assert "Held-out text." in text and "Another held-out paragraph." in text


def test_tokenization_is_cached(shakespeare, sp_tok, tmp_path, monkeypatch):
    cfg = _cfg(shakespeare, str(tmp_path / "c"))
    first = next(make_iterator(cfg, sp_tok))
    assert len(list((tmp_path / "c" / "tokens").iterdir())) == 1

    def fail(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(type(sp_tok), "encode_batch", fail)
    _same(next(make_iterator(cfg, sp_tok)), first)
    # A different reading of the corpus is a different entry.
    monkeypatch.undo()
    make_iterator(cfg.replace(doc_split="line"), sp_tok)
    assert len(list((tmp_path / "c" / "tokens").iterdir())) == 2
