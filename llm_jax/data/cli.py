"""`llm-jax tokenizer train | encode | decode`: build a tokenizer and inspect what it does.

    llm-jax tokenizer train --input corpus.txt more_texts/ --vocab-size 8000 \
        --model-type unigram --out runs/tok
    llm-jax tokenizer encode --tokenizer runs/tok "To be, or not to be"
    llm-jax tokenizer decode --tokenizer runs/tok 1012 45 7 ...
"""

from __future__ import annotations

import argparse
import sys

from llm_jax.data.config import DataConfig
from llm_jax.data.tokenize import train_tokenizer_from
from llm_jax.data.tokenizer import MAX_SENTINELS, MODEL_TYPES, load_tokenizer


# Long because it is the argparse table of three subcommands, read top to bottom like --help.
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `tokenizer` with its `train`, `encode` and `decode` subcommands."""
    tok = subparsers.add_parser(
        "tokenizer",
        help="train, encode, decode with a tokenizer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = tok.add_subparsers(dest="tokenizer_command", required=True)

    train = sub.add_parser("train", help="train a SentencePiece or character tokenizer")
    train.add_argument(
        "--input", nargs="+", required=True, metavar="PATH", help="UTF-8 text files or folders"
    )
    train.add_argument("--out", required=True, metavar="DIR", help="folder to save it in")
    train.add_argument("--model-type", choices=MODEL_TYPES, default="unigram")
    train.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="total ids incl. specials and sentinels (default 8000; char: all characters)",
    )
    train.add_argument(
        "--character-coverage",
        type=float,
        default=None,
        help="default 0.9995 (SentencePiece), 1.0 (char)",
    )
    train.add_argument(
        "--no-byte-fallback",
        dest="byte_fallback",
        action="store_false",
        help="unknown characters become <unk> (no exact round trip)",
    )
    train.add_argument(
        "--num-sentinels",
        type=int,
        default=0,
        help=f"T5 <extra_id_i> sentinels at the end of the vocabulary (T5 span corruption "
        f"uses {MAX_SENTINELS}; default 0)",
    )
    train.add_argument(
        "--max-sentences",
        type=int,
        default=1_000_000,
        help="train on a seeded sample of at most this many lines",
    )
    train.add_argument("--file-pattern", default="*", help="file names to read inside folders")
    train.set_defaults(func=_train)

    encode = sub.add_parser("encode", help="print the ids (or pieces) of a text")
    encode.add_argument("--tokenizer", required=True, metavar="DIR")
    src = encode.add_mutually_exclusive_group(required=True)
    src.add_argument("text", nargs="?", help="the text to encode")
    src.add_argument("--file", metavar="PATH", help="encode this file's content instead")
    encode.add_argument("--pieces", action="store_true", help="print pieces instead of ids")
    encode.set_defaults(func=_encode)

    decode = sub.add_parser("decode", help="print the text of some ids")
    decode.add_argument("--tokenizer", required=True, metavar="DIR")
    decode.add_argument(
        "ids",
        nargs="+",
        help="token ids (separate arguments or one whitespace/comma separated string)",
    )
    decode.add_argument("--skip-special-tokens", action="store_true")
    decode.set_defaults(func=_decode)


def _train(args: argparse.Namespace) -> int:
    vocab = args.vocab_size
    if vocab is None and args.model_type != "char":
        vocab = 8000
    config = DataConfig(
        paths=tuple(args.input),
        file_pattern=args.file_pattern,
        tokenizer_path=args.out,
        tokenizer_type=args.model_type,
        vocab_size=vocab,
        character_coverage=args.character_coverage,
        byte_fallback=args.byte_fallback,
        num_sentinels=args.num_sentinels,
        tokenizer_max_sentences=args.max_sentences,
    )
    tok = train_tokenizer_from(config, what="--input")
    specials = " ".join(f"{k}={v}" for k, v in tok.special_ids.items())
    sentinels = (
        f", sentinels <extra_id_0>={tok.sentinel_id(0)}..<extra_id_{tok.num_sentinels - 1}>="
        f"{tok.sentinel_id(tok.num_sentinels - 1)}"
        if tok.num_sentinels
        else ""
    )
    print(f"saved {tok.model_type} tokenizer (vocab {tok.vocab_size}) to {args.out}")
    print(f"special ids: {specials}{sentinels}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    if args.file is not None:
        from llm_jax.data.corpus import read_text

        text, _ = read_text(args.file)
    else:
        text = args.text
    ids = tok.encode(text)
    if args.pieces:
        print(" ".join(tok.id_to_piece(i) for i in ids))
    else:
        print(" ".join(map(str, ids)))
    return 0


def _decode(args: argparse.Namespace) -> int:
    tok = load_tokenizer(args.tokenizer)
    raw = " ".join(args.ids).replace(",", " ").split()
    try:
        ids = [int(x) for x in raw]
    except ValueError as e:
        raise ValueError(f"decode takes integer ids; {e}") from e
    sys.stdout.write(tok.decode(ids, skip_special_tokens=args.skip_special_tokens) + "\n")
    return 0
