"""Hugging Face tokenizers behind our `Tokenizer` interface, and back to Hugging Face files.

- A `tokenizer.json` (the `tokenizers` library's format: GPT-2 byte-level BPE, BERT
  WordPiece, fast T5/LLaMA tokenizers) becomes an `HFTokenizer`.
- A SentencePiece `spiece.model` (T5) or `tokenizer.model` (LLaMA 1/2) becomes our
  `SentencePieceTokenizer`, with T5's `<extra_id_i>` sentinels appended as in T5.

Special tokens are named as in `llm_jax.data.tokenizer` (pad, unk, bos, eos, cls, sep,
mask), read from `tokenizer_config.json` / `special_tokens_map.json`. As everywhere in the
project, `encode` never adds special tokens; `HFTokenizer.encode(text,
add_special_tokens=True)` gives exactly `AutoTokenizer(...)(text).input_ids` when a caller
wants Hugging Face's own BOS/EOS/[CLS] framing.

`HFTokenizer.save(dir)` writes our `tokenizer.json` metadata (model_type
"hf_tokenizers") beside the Hugging Face file, renamed `hf_tokenizer.json` because both
formats use the name `tokenizer.json`; `load_hf_tokenizer` reads either format, and also
every folder `llm_jax.data.load_tokenizer` reads.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from llm_jax.data.tokenizer import (
    SPECIAL_NAMES,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

_HF_JSON = "tokenizer.json"
_OUR_HF_JSON = "hf_tokenizer.json"
_SP_NAMES = ("spiece.model", "tokenizer.model")
# Files that make up a Hugging Face tokenizer (copied verbatim when exporting a folder).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
# Pieces recognised as special tokens when no tokenizer_config.json names them.
_FALLBACK_PIECES = {
    "pad": ("<pad>", "[PAD]"),
    "unk": ("<unk>", "[UNK]"),
    "bos": ("<s>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("</s>", "<|end_of_text|>", "<|endoftext|>"),
    "cls": ("[CLS]", "<cls>"),
    "sep": ("[SEP]", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
}


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_special_tokens(directory: str | os.PathLike) -> dict[str, str]:
    """Name ("pad", "eos", ...) -> token string, from tokenizer_config.json and
    special_tokens_map.json (the latter wins, as in transformers)."""
    root = Path(directory)
    out: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = root / name
        if file.is_file():
            data = json.loads(file.read_text(encoding="utf-8"))
            for special in SPECIAL_NAMES:
                token = _token_content(data.get(f"{special}_token"))
                if token is not None:
                    out[special] = token
    return out


def _num_extra_ids(directory: Path) -> int | None:
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text(encoding="utf-8"))
    if "extra_ids" in data:
        return int(data["extra_ids"])
    extra = data.get("additional_special_tokens") or data.get("extra_special_tokens") or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    names = [_token_content(t) for t in extra]
    return sum(1 for t in names if t and t.startswith("<extra_id_")) or None


class HFTokenizer(Tokenizer):
    """A `tokenizers` library tokenizer (a Hugging Face `tokenizer.json`).

    Ids are the Hugging Face ids, added tokens included; `vocab_size` is the highest id
    plus one. T5 sentinels `<extra_id_i>` are recognised when they end the vocabulary
    (extra_id_0 highest), as in T5.
    """

    model_type = "hf_tokenizers"

    def __init__(self, tokenizer_json: str, *, special_tokens: dict[str, str] | None = None):
        """Args:
        tokenizer_json: the text of a Hugging Face `tokenizer.json`.
        special_tokens: name -> token string (see `read_special_tokens`); None recognises
          the usual pieces (<pad>, [CLS], <|endoftext|>, ...) among the added tokens.
        """
        from tokenizers import Tokenizer as RustTokenizer

        self._json = tokenizer_json
        self._tok = RustTokenizer.from_str(tokenizer_json)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._size = max(vocab.values()) + 1 if vocab else 0
        if special_tokens is None:
            special_tokens = {}
            for name, pieces in _FALLBACK_PIECES.items():
                for piece in pieces:
                    if piece in vocab:
                        special_tokens[name] = piece
                        break
        self.special_tokens = {}
        special_ids = {}
        for name, token in special_tokens.items():
            i = self._tok.token_to_id(token)
            if i is not None:
                self.special_tokens[name] = token
                special_ids[name] = i
        sentinels = 0
        while self._tok.token_to_id(f"<extra_id_{sentinels}>") == self._size - 1 - sentinels:
            sentinels += 1
        super().__init__(special_ids, min(sentinels, 100))

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> HFTokenizer:
        """From a Hugging Face model folder with `tokenizer.json`."""
        root = Path(directory)
        specials = read_special_tokens(root) or None
        return cls((root / _HF_JSON).read_text(encoding="utf-8"), special_tokens=specials)

    @property
    def vocab_size(self) -> int:
        return self._size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Ids of `text`; `add_special_tokens=True` adds Hugging Face's framing."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Hugging Face's own decoding (specials shown as their pieces unless skipped)."""
        checked = [self._check_id(i) for i in ids]
        return self._tok.decode(checked, skip_special_tokens=skip_special_tokens)

    def _decode_ordinary(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def _ordinary_piece(self, i: int) -> str:
        return self._tok.id_to_token(i) or ""

    @functools.cached_property
    def _special_to_piece(self) -> dict[int, str]:
        out = {self.special_ids[n]: t for n, t in self.special_tokens.items()}
        out.update({self.sentinel_id(k): f"<extra_id_{k}>" for k in range(self.num_sentinels)})
        return out

    def _payload(self, out: Path) -> dict[str, Any]:
        (out / _OUR_HF_JSON).write_text(self._json, encoding="utf-8")
        return {"model_file": _OUR_HF_JSON, "special_tokens": self.special_tokens}

    def _model_bytes(self) -> bytes:
        return self._json.encode()

    def save_hf(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` + `tokenizer_config.json` for `AutoTokenizer`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / _HF_JSON).write_text(self._json, encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({f"{n}_token": t for n, t in self.special_tokens.items()})
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return out


def _sentencepiece_from_dir(root: Path, file: Path) -> SentencePieceTokenizer:
    extra = _num_extra_ids(root)
    if extra is None:
        config = root / "config.json"
        is_t5 = config.is_file() and json.loads(config.read_text()).get("model_type") == "t5"
        extra = 100 if is_t5 else 0  # T5Tokenizer's default extra_ids
    return SentencePieceTokenizer(file.read_bytes(), num_sentinels=extra)


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer with our interface from any tokenizer folder this project meets.

    Args:
      path: a Hugging Face model folder (`tokenizer.json`, else `spiece.model` /
        `tokenizer.model`), a folder saved by `Tokenizer.save` (ours, including
        `HFTokenizer.save`), or one of those files.

    Raises:
      FileNotFoundError: no tokenizer files there (the expected names are listed).
    """
    p = Path(path)
    if p.is_file():
        if p.suffix == ".model":
            return _sentencepiece_from_dir(p.parent, p)
        p = p.parent
    meta = p / _HF_JSON
    if meta.is_file():
        data = json.loads(meta.read_text(encoding="utf-8"))
        if "format_version" not in data:
            return HFTokenizer.from_dir(p)
        if data.get("model_type") == HFTokenizer.model_type:
            tok = HFTokenizer(
                (p / data["model_file"]).read_text(encoding="utf-8"),
                special_tokens=data.get("special_tokens", {}),
            )
            if tok.vocab_size != data["vocab_size"] or tok.special_ids != data["special_ids"]:
                raise ValueError(f"{meta} does not match the model beside it (vocab/special ids).")
            return tok
        return load_tokenizer(p)
    for name in _SP_NAMES:
        if (p / name).is_file():
            return _sentencepiece_from_dir(p, p / name)
    raise FileNotFoundError(
        f"no tokenizer in {str(p)!r}: expected {_HF_JSON} (Hugging Face or ours) or a "
        f"SentencePiece {' / '.join(_SP_NAMES)}."
    )


def save_hf_tokenizer(
    tokenizer: Tokenizer | str | os.PathLike,
    directory: str | os.PathLike,
    *,
    t5: bool = False,
    add_bos: bool | None = None,
) -> Path:
    """Write tokenizer files that transformers' `AutoTokenizer` reads.

    Args:
      tokenizer: a `Tokenizer`, or a folder: a Hugging Face folder's tokenizer files are
        copied verbatim; any other tokenizer folder is loaded and written.
      directory: the output folder (created).
      t5: a SentencePiece model is written as T5's `spiece.model` (with `extra_ids`) rather
        than LLaMA's `tokenizer.model`.
      add_bos: for a SentencePiece model written as LLaMA's: whether `AutoTokenizer` puts
        BOS before the text, as the model saw in training (`data.add_bos`); None leaves the
        transformers default. EOS is never appended (a prompt must not end a document),
        as in LLaMA's own tokenizers even though documents ended with EOS in training.

    Raises:
      ValueError: a character tokenizer (no Hugging Face equivalent).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if not isinstance(tokenizer, Tokenizer):
        src = Path(tokenizer)
        hf_json = src / _HF_JSON
        is_ours = hf_json.is_file() and "format_version" in json.loads(hf_json.read_text())
        present = [n for n in TOKENIZER_FILES if (src / n).is_file()]
        if present and not is_ours:
            for name in present:
                shutil.copyfile(src / name, out / name)
            return out
        tokenizer = load_hf_tokenizer(src)
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.save_hf(out)
    if not isinstance(tokenizer, SentencePieceTokenizer):
        raise ValueError(
            f"{type(tokenizer).__name__} has no Hugging Face tokenizer format; export the "
            "model without a tokenizer, or train a SentencePiece tokenizer."
        )
    name = "spiece.model" if t5 else "tokenizer.model"
    (out / name).write_bytes(tokenizer._model_bytes())
    config: dict[str, Any] = {"tokenizer_class": "T5Tokenizer" if t5 else "LlamaTokenizer"}
    for special, i in tokenizer.special_ids.items():
        config[f"{special}_token"] = tokenizer.id_to_piece(i)
    if t5:
        config["extra_ids"] = tokenizer.num_sentinels
    elif add_bos is not None:
        config.update(add_bos_token=add_bos, add_eos_token=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
