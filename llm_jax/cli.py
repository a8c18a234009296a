"""The `llm-jax` command line. Each subcommand lives beside the code it drives and
registers itself here through an `add_parser(subparsers)` function."""

from __future__ import annotations

import argparse
import os
import signal
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from llm_jax.compress.cli import add_parser as add_prune
    from llm_jax.convert.cli import add_parser as add_convert
    from llm_jax.data.cli import add_parser as add_data
    from llm_jax.eval.cli import add_parser as add_eval
    from llm_jax.models.cli import add_parser as add_models
    from llm_jax.models.word2vec_cli import add_parser as add_word2vec
    from llm_jax.sample.cli import add_parser as add_sample
    from llm_jax.train.cli import add_parser as add_train
    from llm_jax.train.plan_cli import add_parser as add_plan

    add_train(sub)
    add_models(sub)
    add_data(sub)
    add_convert(sub)
    add_sample(sub)
    add_eval(sub)
    add_word2vec(sub)
    add_plan(sub)
    add_prune(sub)
    return parser


def _leave_on_signal(signum: int, frame) -> None:
    # Until a command installs its own handling (training saves a checkpoint first), a
    # signal ends the process at once with one line: a KeyboardInterrupt raised inside the
    # imports of JAX and XLA can be swallowed there or abort the interpreter's teardown.
    os.write(2, f"llm-jax: interrupted by signal {signum}; exiting.\n".encode())
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the real command, not a call from Python code or a test
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _leave_on_signal)
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # called from Python (the command line exits in the handler)
        print("llm-jax: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"llm-jax {getattr(args, 'command', '')}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # e.g. a non-finite loss: the message says what to change
        print(f"llm-jax {getattr(args, 'command', '')}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
