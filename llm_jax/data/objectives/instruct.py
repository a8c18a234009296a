"""Instruction tuning (GPT, LLaMA): JSON Lines of `{"prompt": ..., "response": ...}`, each
example `[bos] prompt response [eos]` as one causal-LM sequence whose loss falls on the
response tokens (and the EOS) only.

Examples are packed whole into rows of T + 1 tokens (next-fit, corpus order) and never
split over two rows; each gets its own segment id and positions from 0, so attention and
next-token targets never cross from one example into the next. An example longer than a
row keeps its first T + 1 tokens (the tail of its response and its EOS are cut, so a cut
response never teaches the model to stop there); an example whose prompt alone fills the
row has nothing left to learn and is dropped. Both are counted in one warning.

`data.add_bos` / `data.add_eos` frame the example as for `clm`.

Batch (int32 unless noted), [B, T]: tokens, targets, weights (f32), segment_ids, positions —
the `clm` contract, so the `clm` loss trains it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llm_jax.data import corpus as corpus_lib
from llm_jax.data import packing
from llm_jax.data.objectives.base import ObjectiveSpec, Split
from llm_jax.data.objectives.clm import ClmSource, clm_batch

if TYPE_CHECKING:
    from llm_jax.data.config import DataConfig
    from llm_jax.data.tokenizer import Tokenizer

FIELDS = ("prompt", "response")


# Reading -------------------------------------------------------------------------------------


def _decode_utf8(path: Path) -> str:
    """The file as text; JSON Lines must be UTF-8, so a bad byte is an error naming its line
    (unlike running text, where a replaced character costs little, a mangled JSON string
    would silently change the training target)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{path}:{line}: byte 0x{raw[e.start]:02x} is not valid UTF-8; JSON Lines files "
            "must be UTF-8: re-encode the file (e.g. `iconv -t UTF-8`)."
        ) from None


def _parse_line(path: Path, lineno: int, line: str) -> tuple[str, str]:
    """(prompt, response) of one JSON Lines record, or ValueError naming the file and line."""
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line must be one "
            'object such as {"prompt": "...", "response": "..."}.'
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{where} holds a JSON {type(record).__name__}, not an object; each line must be "
            '{"prompt": "...", "response": "..."}.'
        )
    missing = [k for k in FIELDS if k not in record]
    if missing:
        raise ValueError(
            f"{where} has no {' or '.join(repr(k) for k in missing)} key (keys: "
            f"{sorted(record)}); each line needs both a 'prompt' and a 'response' string."
        )
    bad = [k for k in FIELDS if not isinstance(record[k], str)]
    if bad:
        raise ValueError(
            f"{where}: {bad[0]!r} is a JSON {type(record[bad[0]]).__name__}; 'prompt' and "
            "'response' must be strings."
        )
    return record["prompt"], record["response"]


def read_jsonl(
    paths: Sequence[str | Path], pattern: str = "*", what: str = "DataConfig.paths"
) -> tuple[list[str], list[str]]:
    """Prompts and responses of every JSON Lines file, in file and line order.

    Blank lines are skipped; other keys of a record are ignored.

    Raises:
        ValueError: naming the file (and line) for a file with no records, a line that is
            not a JSON object with string "prompt" and "response", or bytes that are not
            UTF-8.
    """
    prompts: list[str] = []
    responses: list[str] = []
    for path in corpus_lib.list_files(paths, pattern, what):
        before = len(prompts)
        for lineno, line in enumerate(_decode_utf8(path).split("\n"), 1):
            if line.strip():
                prompt, response = _parse_line(path, lineno, line)
                prompts.append(prompt)
                responses.append(response)
        if len(prompts) == before:
            raise ValueError(
                f"{what}: {path} holds no prompt-response records (it is empty or blank); "
                'write one {"prompt": "...", "response": "..."} object per line, or drop '
                "the file."
            )
    return prompts, responses


def read(
    config: DataConfig, tokenizer: Tokenizer, files: Sequence[str], what: str
) -> tuple[dict[str, Any], Callable[[], corpus_lib.TokenizedCorpus]]:
    """Field "examples" (each prompt's ids followed by its response's), array
    "prompt_lengths" (int64 [n], how many of an example's ids are its prompt).

    Prompt and response are tokenized apart, so the boundary between them is exact
    whatever the tokenizer would merge across it.
    """

    def build() -> corpus_lib.TokenizedCorpus:
        prompts, responses = read_jsonl(files, config.file_pattern, what)
        p = corpus_lib.encode_ragged(tokenizer, prompts)
        r = corpus_lib.encode_ragged(tokenizer, responses)
        lengths = p.lengths + r.lengths
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.empty(int(offsets[-1]), np.int32)
        within = np.arange(len(tokens)) - np.repeat(offsets[:-1], lengths)
        is_prompt = within < np.repeat(p.lengths, lengths)
        tokens[is_prompt], tokens[~is_prompt] = p.tokens, r.tokens
        return corpus_lib.TokenizedCorpus(
            {"examples": corpus_lib.Ragged(tokens, offsets)},
            {"prompt_lengths": p.lengths.astype(np.int64)},
            {},
        )

    return {"kind": "jsonl"}, build


def tokenizer_texts(config: DataConfig) -> list[str]:
    """Prompts and responses: a tokenizer for instruction data learns from both."""
    prompts, responses = read_jsonl(config.paths, config.file_pattern)
    return prompts + responses


# Pieces and batches --------------------------------------------------------------------------


def instruct_pieces(
    starts: np.ndarray,
    lengths: np.ndarray,
    prompt_lengths: np.ndarray,
    row_len: int,
    bos_id: int | None,
    eos_id: int | None,
) -> tuple[packing.Pieces, np.ndarray]:
    """Each example `[bos] prompt response [eos]` as one piece of at most `row_len` tokens.

    A longer example keeps its first `row_len` tokens; one whose `[bos] prompt` fills
    `row_len` (no response token left to predict) is dropped.

    Args:
        starts: int64 [n], offset of each example's first token in the stream.
        lengths: int64 [n], prompt + response tokens of each example.
        prompt_lengths: int64 [n], prompt tokens of each example.
        row_len: tokens per row (T + 1).

    Returns:
        (pieces of the kept examples, in order; the column inside each kept piece where its
        response starts, int64 [P]).
    """
    a, e = int(bos_id is not None), int(eos_id is not None)
    response_start = a + np.asarray(prompt_lengths, np.int64)
    kept = np.flatnonzero(response_start < row_len)
    whole = lengths[kept] + a + e <= row_len
    pieces = packing.Pieces(
        start=np.asarray(starts, np.int64)[kept],
        length=np.minimum(lengths[kept], row_len - a).astype(np.int64),
        prefix=np.full(len(kept), bos_id if a else -1, np.int32),
        suffix=np.where(whole & bool(e), eos_id if e else -1, -1).astype(np.int32),
    )
    _warn_cut(len(starts), int((~whole).sum()), len(starts) - len(kept), row_len)
    return pieces, response_start[kept]


def response_weights(
    segment_ids: np.ndarray, positions: np.ndarray, response_start: np.ndarray
) -> np.ndarray:
    """float32 [B, T+1]: 1 where a token belongs to its example's response (or is its EOS).

    Args:
        segment_ids, positions: int [B, T+1] of packed rows.
        response_start: int [B, T+2], indexed by segment id: the column inside that
            segment's piece where its response starts.
    """
    start = np.take_along_axis(response_start, segment_ids.astype(np.int64), axis=1)
    return ((segment_ids > 0) & (positions >= start)).astype(np.float32)


class InstructSource(ClmSource):
    """Whole prompt-response examples packed into rows; `clm` batches whose weights are 1
    only on next-token targets inside a response (see `response_weights`)."""

    def __init__(self, stream, pieces, layout, T: int, response_start: np.ndarray):
        super().__init__(stream, pieces, layout, T)
        self.response_start = response_start  # int64 [P], per piece

    def build(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        pid, brow, seg = packing.row_pieces(self.layout, indices)
        shape = (len(indices), self.T + 1)
        rows, segs, pos = packing.gather(
            self.stream, self.pieces, self.layout.offsets[0], pid, brow, seg, shape
        )
        # Segment ids of a row are 1..k, so a [b, T+2] table indexed by them holds each
        # piece's response start; padding (segment 0) never matches a real position.
        table = np.full((len(indices), self.T + 2), self.T + 1, np.int64)
        table[brow, seg] = self.response_start[pid]
        batch = clm_batch(rows, segs, pos)
        batch["weights"] *= response_weights(segs, pos, table)[:, 1:]
        return batch


def _warn_cut(n: int, cut: int, dropped: int, row_len: int) -> None:
    if not (cut or dropped):
        return
    warnings.warn(
        f"{cut} of {n} prompt-response examples are longer than seq_len + 1 = {row_len} "
        f"tokens and keep only their first {row_len} (their response's end and EOS are cut); "
        f"{dropped} whose prompt alone fills a row were dropped. Raise DataConfig.seq_len to "
        "keep them whole.",
        stacklevel=4,
    )


def instruct_source(split: Split) -> InstructSource:
    """The split's examples as packed rows of T + 1 tokens, one piece per example, framed
    by BOS / EOS as `data.add_bos` / `data.add_eos` say."""
    config, tokenizer, T = split.config, split.tokenizer, split.config.seq_len
    if config.add_bos:
        tokenizer.require("bos", why="DataConfig.add_bos=True")
    if config.add_eos:
        tokenizer.require("eos", why="DataConfig.add_eos=True")
    examples = split.corpus.fields["examples"]
    index = split.keep(len(examples), "prompt-response examples")
    index = np.arange(len(examples)) if index is None else index
    pieces, response_start = instruct_pieces(
        examples.offsets[index],
        examples.lengths[index],
        split.corpus.arrays["prompt_lengths"][index],
        T + 1,
        tokenizer.bos_id if config.add_bos else None,
        tokenizer.eos_id if config.add_eos else None,
    )
    layout = packing.pack([pieces.size], [T + 1], config.pack)
    return InstructSource(examples.tokens, pieces, layout, T, response_start)


SPEC = ObjectiveSpec(
    name="instruct",
    formats=("jsonl",),
    read=read,
    source=instruct_source,
    loss_weights={"lm": "weights"},
    main_loss="lm",
    token_fields=("tokens",),
    tokenizer_texts=tokenizer_texts,
)
