"""Instruction data (JSON Lines for `objective: instruct`) from verse-aligned EN-ES pairs.

    python benchmarks/make_instruct_data.py [--input TSV] [--out JSONL] [--limit N]

Each `ref<TAB>english<TAB>spanish` row becomes
`{"prompt": "Translate to Spanish: <english>\\n", "response": "<spanish>"}`. The default
input is ../shared/data/bible-kjv-rv1909.en-es.tsv (31,084 verses, public domain); the
committed tests/data/instruct-en-es.jsonl is this script's output for
`--input tests/data/bible-en-es.tsv --limit 250` (a test checks that they agree).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = ROOT.parent / "shared" / "data" / "bible-kjv-rv1909.en-es.tsv"
PROMPT = "Translate to Spanish: {}\n"


def translation_records(tsv: str, limit: int | None = None) -> list[dict[str, str]]:
    """Prompt-response records of the first `limit` rows (all when None) of a
    `ref<TAB>english<TAB>spanish` table; blank rows are skipped."""
    records = []
    for line in tsv.split("\n"):
        if not line.strip():
            continue
        _, english, spanish = line.rstrip("\r").split("\t")[:3]
        records.append({"prompt": PROMPT.format(english), "response": spanish})
        if limit is not None and len(records) == limit:
            break
    return records


def to_jsonl(records: list[dict[str, str]]) -> str:
    """One JSON object per line, UTF-8 characters kept as they are."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--out", type=Path, default=Path("instruct-en-es.jsonl"))
    parser.add_argument("--limit", type=int, default=None, help="first N rows only")
    args = parser.parse_args(argv)
    records = translation_records(args.input.read_text(encoding="utf-8"), args.limit)
    args.out.write_text(to_jsonl(records), encoding="utf-8")
    print(f"wrote {len(records)} prompt-response records to {args.out}")


if __name__ == "__main__":
    main()
