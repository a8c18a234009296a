"""Tokenizers: exact round trip, special-id layout, save/load, char tokenizer, CLI."""

import json

import numpy as np
import pytest

from llm_jax.data import (
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_tokenizer,
)
from llm_jax.data.tokenizer import SPECIAL_NAMES

# Whitespace runs, tabs, CRLF, leading/trailing spaces, accents, characters no training
# line contains (CJK, emoji), literal special-token text: all must survive exactly.
TRICKY = [
    "",
    " ",
    "\n",
    "  two leading spaces, two  inner, two trailing  ",
    "tab\there\r\nwindows line\n\nblank line above\n",
    "¿Qué pasó? Él comió piñas en el año 1909 — «¡ñandú!»",
    "日本語のテキスト and emoji 🤖🎭",
    "<mask> <cls> <extra_id_0> </s> <pad>",
]


@pytest.fixture(scope="module")
def shakespeare(corpora):
    return (corpora / "shakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def spanish(corpora):
    rows = (corpora / "bible-en-es.tsv").read_text(encoding="utf-8")
    return "\n".join(line.split("\t")[2] for line in rows.splitlines()) + "\n"


def _train(kind, text, vocab=800, **kw):
    return train_tokenizer(
        texts=[text],
        model_type=kind,
        vocab_size=None if kind == "char" else vocab,
        num_sentinels=100,  # T5's layout, checked below
        **kw,
    )


@pytest.fixture(scope="module")
def tokenizers(shakespeare, spanish):
    return {
        (kind, name): _train(kind, text)
        for kind in ("bpe", "unigram", "char")
        for name, text in (("shakespeare", shakespeare), ("spanish", spanish))
    }


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
@pytest.mark.parametrize("corpus", ["shakespeare", "spanish"])
def test_round_trip_is_exact(tokenizers, shakespeare, spanish, kind, corpus):
    tok = tokenizers[(kind, corpus)]
    text = shakespeare if corpus == "shakespeare" else spanish
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for s in TRICKY:
        assert tok.decode(tok.encode(s)) == s, (kind, corpus, s)
    # Batch encoding is the same as one-by-one encoding.
    docs = text.split("\n\n")[:50]
    assert tok.encode_batch(docs) == [tok.encode(d) for d in docs]


def test_spanish_accents_are_real_pieces_not_bytes(tokenizers, spanish):
    tok = tokenizers[("unigram", "spanish")]
    pieces = {tok.id_to_piece(i) for i in tok.encode(spanish)}
    # Coverage 0.9995 keeps the accented letters of Spanish as characters of the vocabulary.
    assert any("ó" in p for p in pieces) and any("ñ" in p for p in pieces)


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_special_ids_layout_and_sentinels(tokenizers, kind):
    tok = tokenizers[(kind, "shakespeare")]
    assert {n: tok.special_ids[n] for n in SPECIAL_NAMES} == {
        n: i for i, n in enumerate(SPECIAL_NAMES)
    }
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert (tok.cls_id, tok.sep_id, tok.mask_id) == (4, 5, 6)
    V = tok.vocab_size
    if kind != "char":
        assert V == 800
    assert tok.num_sentinels == 100
    assert tok.sentinel_id(0) == V - 1 and tok.sentinel_id(99) == V - 100
    np.testing.assert_array_equal(tok.sentinel_ids, V - 1 - np.arange(100))
    assert tok.id_to_piece(V - 1) == "<extra_id_0>"
    assert tok.decode([tok.cls_id, tok.sentinel_id(3), tok.mask_id]) == "<cls><extra_id_3><mask>"
    assert tok.decode([tok.cls_id, tok.sentinel_id(3)], skip_special_tokens=True) == ""
    with pytest.raises(ValueError, match="num_sentinels=100"):
        tok.sentinel_id(100)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([V])


@pytest.mark.parametrize("kind", ["bpe", "unigram", "char"])
def test_encode_never_emits_special_ids(tokenizers, shakespeare, kind):
    tok = tokenizers[(kind, "shakespeare")]
    special = set(tok.all_special_ids.tolist())
    for s in [shakespeare[:20_000], *TRICKY]:
        assert not special & set(tok.encode(s)), s


@pytest.mark.parametrize("kind", ["unigram", "char"])
def test_save_and_load_by_path(tokenizers, tmp_path, kind):
    tok = tokenizers[(kind, "spanish")]
    out = tok.save(tmp_path / "tok")
    meta = json.loads((out / "tokenizer.json").read_text())
    assert meta["special_ids"]["mask"] == 6 and meta["vocab_size"] == tok.vocab_size
    assert meta["num_sentinels"] == 100
    for path in (out, out / "tokenizer.json"):
        back = load_tokenizer(path)
        assert type(back) is type(tok)
        assert back.vocab_size == tok.vocab_size and back.special_ids == tok.special_ids
        assert back.fingerprint == tok.fingerprint
        for s in TRICKY:
            assert back.encode(s) == tok.encode(s)


def test_load_bare_sentencepiece_model_discovers_specials(tokenizers, tmp_path):
    tok = tokenizers[("bpe", "shakespeare")]
    tok.save(tmp_path)
    bare = load_tokenizer(tmp_path / "spm.model", num_sentinels=100)
    assert isinstance(bare, SentencePieceTokenizer)
    assert bare.special_ids == tok.special_ids
    assert bare.vocab_size == tok.vocab_size
    assert bare.encode("To be, or not") == tok.encode("To be, or not")


def test_char_tokenizer_is_the_classic_char_level_vocabulary(shared_data):
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = train_tokenizer(
        texts=[text], model_type="char", vocab_size=None, byte_fallback=False, num_sentinels=0
    )
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == sorted(set(text)) and len(tok.chars) == 65
    assert tok.vocab_size == len(SPECIAL_NAMES) + 65
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.decode(ids) == text
    # One id per character, in character order after the specials.
    assert tok.encode("AB") == [len(SPECIAL_NAMES) + tok.chars.index(c) for c in "AB"]
    # No byte fallback: an unseen character is <unk> (and the round trip is lossy).
    assert tok.encode("é") == [tok.unk_id]


def test_char_byte_fallback_and_vocab_cap():
    tok = train_tokenizer(
        texts=["abcabcabd\n"], model_type="char", vocab_size=None, num_sentinels=100
    )
    assert tok.vocab_size == 7 + 256 + 5 + 100  # specials, bytes, a b c d \n, sentinels
    ids = tok.encode("aé")
    assert ids[0] == tok.encode("a")[0] and len(ids) == 3  # é is two UTF-8 bytes
    assert [tok.id_to_piece(i) for i in ids[1:]] == ["<0xC3>", "<0xA9>"]
    capped = train_tokenizer(
        texts=["aaab\n"], model_type="char", vocab_size=7 + 256 + 100 + 1, num_sentinels=100
    )
    assert capped.chars == ["a"]  # only the most frequent character fits
    assert capped.decode(capped.encode("ab\n")) == "ab\n"


def test_training_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(texts=["a b c\n"], model_type="unigram", vocab_size=300)
    with pytest.raises(ValueError, match="no such file or folder"):
        train_tokenizer(tmp_path / "missing.txt", model_type="bpe", vocab_size=500)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="no non-blank lines"):
        train_tokenizer(tmp_path / "empty.txt", model_type="bpe", vocab_size=500)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(texts=["x"], model_type="wordpiece")
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path / "nothing")


def test_cli_train_encode_decode(corpora, tmp_path, capsys):
    from llm_jax.cli import main

    out = tmp_path / "tok"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = (corpora / "shakespeare.txt").read_text(encoding="utf-8")[:100_000]
    (corpus / "a.txt").write_text(text)
    rc = main(
        ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "600",
         "--model-type", "bpe", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert "vocab 600" in capsys.readouterr().out
    sample = "First Citizen:\nBefore we proceed  any further, héar me speak."
    assert main(["tokenizer", "encode", "--tokenizer", str(out), sample]) == 0
    ids = capsys.readouterr().out.split()
    assert main(["tokenizer", "decode", "--tokenizer", str(out), *ids]) == 0
    assert capsys.readouterr().out == sample + "\n"
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--pieces", "to be"]) == 0
    assert "▁be" in capsys.readouterr().out
    # Errors are one line and a non-zero status, not a traceback.
    assert main(["tokenizer", "decode", "--tokenizer", str(out), "99999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    rc = main(["tokenizer", "train", "--input", str(tmp_path / "nope"), "--out", str(out)])
    assert rc == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_cli_char_tokenizer(shared_data, tmp_path, capsys):
    from llm_jax.cli import main

    out = tmp_path / "char"
    path = str(shared_data / "tinyshakespeare.txt")
    args = ["tokenizer", "train", "--input", path, "--model-type", "char", "--out", str(out)]
    assert main([*args, "--num-sentinels", "0", "--no-byte-fallback"]) == 0
    assert "vocab 72" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("ROMEO:\nO, she doth teach")) == "ROMEO:\nO, she doth teach"


def test_vocab_limit_is_quoted_in_the_callers_vocab_size_terms():
    # SentencePiece is asked for vocab_size - num_sentinels pieces; its "<= N" counts pieces.
    text = ["To be, or not to be, that is the question.\n", "Whether 'tis nobler in the mind.\n"]
    with pytest.raises(ValueError, match=r"use vocab_size <= (\d+)") as info:
        train_tokenizer(texts=text, model_type="unigram", vocab_size=2000, num_sentinels=100)
    most = int(info.value.args[0].split("vocab_size <= ")[1].split()[0])
    assert train_tokenizer(texts=text, vocab_size=most, num_sentinels=100).vocab_size == most
    with pytest.raises(ValueError, match=f"use vocab_size <= {most}"):
        train_tokenizer(texts=text, vocab_size=most + 1, num_sentinels=100)


def test_sentinels_are_reserved_only_for_objectives_that_use_them():
    from llm_jax.data import DataConfig

    assert train_tokenizer(texts=["a b c d\n"], model_type="char").num_sentinels == 0
    assert DataConfig(objective="clm").num_sentinels == 0
    assert DataConfig(objective="mlm").num_sentinels == 0
    assert DataConfig(objective="span_corruption").num_sentinels == 100
    assert DataConfig(objective="clm", num_sentinels=3).num_sentinels == 3
    with pytest.raises(ValueError, match="num_sentinels=100"):
        DataConfig(objective="span_corruption", num_sentinels=0)
    # A default follows the objective through replace(); an explicit value stays.
    assert DataConfig().replace(objective="span_corruption").num_sentinels == 100
    assert DataConfig(objective="span_corruption").replace(objective="mlm").num_sentinels == 0
    assert DataConfig(num_sentinels=3).replace(objective="span_corruption").num_sentinels == 3


def test_lines_over_sentencepiece_limit_are_cut_for_training_not_refused():
    from llm_jax.data.tokenizer import LongLinesWarning

    text = "The cafe is very good. Él comió piñas. " * 4000  # ~160 KB, no newline
    with pytest.warns(LongLinesWarning, match="64 KiB"):
        tok = train_tokenizer(texts=[text], model_type="bpe", vocab_size=300, num_sentinels=0)
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("The cafe is very good.")) < len("The cafe is very good.")
