"""The `llm-jax` command line. Each subcommand lives beside the code it drives and
registers itself here through an `add_parser(subparsers)` function."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from llm_jax.convert.cli import add_parser as add_convert
    from llm_jax.data.cli import add_parser as add_data
    from llm_jax.models.cli import add_parser as add_models
    from llm_jax.sample.cli import add_parser as add_sample
    from llm_jax.train.cli import add_parser as add_train

    add_train(sub)
    add_models(sub)
    add_data(sub)
    add_convert(sub)
    add_sample(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"llm-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. a non-finite loss: the message says what to change
        print(f"llm-jax {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
