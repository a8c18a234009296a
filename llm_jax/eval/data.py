"""Readers for the evaluation tasks' files, each failing with the file, the line number and
what was expected; and the text side of prompts (templates, few-shot, context/continuation
tokenization).

Formats:
    perplexity        plain UTF-8 text; one document (default) or one per non-blank line.
    classification    fastText `__label__NAME text` lines, or TSV (label and text columns).
    generation        TSV `source<TAB>reference`.
    multiple_choice   JSONL `{"context" | "question": str, "choices": [str, ...], "answer": i}`.
    sentiment         fastText `__label__pos|neg text` lines, turned into multiple choice.
    cloze             one passage per line; the last space-separated word is the target.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llm_jax.data import corpus as corpus_lib

DEFAULT_TEMPLATE = "{context} {choice}"
SENTIMENT_TEMPLATE = "Review: {context}\nSentiment: {choice}"
SENTIMENT_WORDS = {"pos": "positive", "neg": "negative", "1": "positive", "0": "negative"}
FEWSHOT_DELIMITER = "\n\n"


@dataclasses.dataclass(frozen=True)
class Choice:
    """One multiple-choice item: the context text, the choices, the index of the right one."""

    context: str
    choices: tuple[str, ...]
    answer: int


file_sha256 = corpus_lib.file_digest  # the hex SHA-256 of a file's bytes


def items_sha256(items: Sequence[Any]) -> str:
    """SHA-256 of in-memory examples (their JSON form)."""
    rows = [dataclasses.astuple(x) if dataclasses.is_dataclass(x) else x for x in items]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()


def _text(path: str | os.PathLike) -> str:
    texts, _ = corpus_lib.read_texts([path], what="--data")
    return texts[0][1]


def _lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """(line number, line) of the non-blank lines; ValueError for a file with none."""
    out = [(i, line) for i, line in enumerate(_text(path).splitlines(), 1) if line.strip()]
    if not out:
        raise ValueError(f"{path} has no non-blank lines; give a file with at least one example.")
    return out


def read_documents(path: str | os.PathLike, documents: str = "file") -> list[str]:
    """The texts perplexity scores: the whole file, or each non-blank line ("lines")."""
    if documents == "lines":
        return [line for _, line in _lines(path)]
    if documents != "file":
        raise ValueError(f"documents={documents!r}: use 'file' or 'lines'.")
    text = _text(path)
    if not text.strip():
        raise ValueError(f"{path} is empty; give a UTF-8 text file to score.")
    return [text]


def read_multiple_choice(path: str | os.PathLike) -> list[Choice]:
    """Items of a JSONL file (see the module doc)."""
    items = []
    for lineno, line in _lines(path):
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg}); expected one object a line.") from e
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
        context = row.get("context", row.get("question"))
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(context, str):
            raise ValueError(f'{where}: expected a "context" (or "question") string.')
        if not (
            isinstance(choices, list)
            and len(choices) >= 2
            and all(isinstance(c, str) for c in choices)
        ):
            raise ValueError(f'{where}: expected "choices": a list of at least 2 strings.')
        if not all(c.strip() for c in choices):
            raise ValueError(f"{where}: choice {[c.strip() for c in choices].index('')} is empty.")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise ValueError(f'{where}: expected "answer": the index of the right choice.')
        if not 0 <= answer < len(choices):
            raise ValueError(f'{where}: "answer" {answer} is not in [0, {len(choices)}).')
        items.append(Choice(context, tuple(choices), answer))
    return items


def read_sentiment(path: str | os.PathLike) -> list[Choice]:
    """fastText sentiment lines as two-way multiple choice: choices ("negative",
    "positive") and the answer from the label (pos/neg or 1/0)."""
    labels, texts, _ = corpus_lib.read_fasttext([path], what="--data")
    words = ("negative", "positive")
    items = []
    for i, (label, text) in enumerate(zip(labels, texts, strict=True)):
        word = SENTIMENT_WORDS.get(label.lower())
        if word is None:
            raise ValueError(
                f"{path}: example {i + 1} has label {label!r}; the sentiment task reads "
                f"__label__pos / __label__neg (or 1 / 0) lines."
            )
        items.append(Choice(text.strip(), words, words.index(word)))
    return items


def read_cloze(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(context, last word) of each passage line (LAMBADA's split: at the last space)."""
    out = []
    for lineno, line in _lines(path):
        context, space, word = line.rstrip().rpartition(" ")
        if not space or not context.strip():
            raise ValueError(
                f"{path}:{lineno}: a cloze passage needs at least two space-separated words "
                "(the context and the word to predict)."
            )
        out.append((context, word))
    return out


def read_pairs(
    path: str | os.PathLike, source_column: int = 0, target_column: int = 1
) -> tuple[list[str], list[str]]:
    """(sources, references) of a TSV file (default columns `source<TAB>reference`)."""
    columns = [source_column, target_column]
    (sources, references), _ = corpus_lib.read_tsv_columns([path], columns, what="--data")
    return sources, references


def read_labelled(
    path: str | os.PathLike, label_column: int = 1, text_column: int = 0
) -> tuple[list[str], list[str]]:
    """(labels, texts) of a fastText file (lines starting `__label__`) or a TSV file."""
    first = _lines(path)[0][1]
    if first.startswith("__label__"):
        labels, texts, _ = corpus_lib.read_fasttext([path], what="--data")
        return labels, texts
    (labels, texts), _ = corpus_lib.read_tsv_columns(
        [path], [label_column, text_column], what="--data"
    )
    return labels, texts


# Prompts -------------------------------------------------------------------------------------


def split_template(template: str, context: str, choice: str) -> tuple[str, str]:
    """(context text, continuation text) of `template` filled in: the continuation is
    everything from `{choice}` on, and whitespace before `{choice}` moves into it (the
    lm-evaluation-harness convention: a word's leading space belongs to its token)."""
    if template.count("{choice}") != 1:
        raise ValueError(f"template {template!r} must contain {{choice}} exactly once.")
    head, tail = template.split("{choice}")
    head = head.replace("{context}", context)
    stripped = head.rstrip()
    return stripped, head[len(stripped) :] + choice + tail.replace("{context}", context)


def check_template(template: str) -> None:
    if "{context}" not in template.split("{choice}")[0]:
        raise ValueError(f"template {template!r} needs {{context}} before {{choice}}.")
    split_template(template, "", "")


def fewshot_indices(
    n_pool: int, index: int, shots: int, seed: int, *, same_file: bool = True
) -> list[int]:
    """`shots` distinct pool indices for item `index`: a pure function of (seed, index), so
    every item gets its own draw; never `index` itself when the pool is the evaluated file
    (`same_file`)."""
    available = n_pool - same_file
    if shots > available:
        raise ValueError(f"--shots {shots} needs {shots} other examples; the pool has {available}.")
    rng = np.random.default_rng([seed, index])
    drawn = rng.permutation(n_pool).tolist()
    return [i for i in drawn if not (same_file and i == index)][:shots]


def fewshot_prompt(template: str, examples: Sequence[Choice]) -> str:
    """The solved examples, each the template with its right choice, joined by blank lines."""
    parts = []
    for ex in examples:
        context, continuation = split_template(template, ex.context, ex.choices[ex.answer])
        parts.append(context + continuation)
    return "".join(p + FEWSHOT_DELIMITER for p in parts)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) the lm-evaluation-harness way: the whole string
    is encoded once and split after the context's own tokens, so merges across the join
    are those of the full text."""
    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context) if context else []
    if whole[: len(head)] != head:  # a merge across the join: fall back to separate encodes
        return head, tokenizer.encode(continuation)
    return head, whole[len(head) :]


def split_sentences(text: str) -> str:
    """One sentence a line (ROUGE-Lsum's input): a break after . ! ? followed by space."""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


def dataset_name(path: str | os.PathLike) -> str:
    return Path(path).name
