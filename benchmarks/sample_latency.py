"""First-token latency of `llm-jax sample` in a cold and a warm process, same run.

    python benchmarks/sample_latency.py --checkpoint runs/tiny [--calls 3] \
        [--prompt "def main("] [--max-new-tokens 16]

Calls the CLI entry point (`llm_jax.cli.main(["sample", ...])`) several times in one
Python process and prints, per call, the time from the call to its first generated token
on stdout and to its end. The first call compiles; later calls load the checkpoint again
(as the CLI does) but reuse the compiled prefill and step, so their first-token time is
the warm-process latency. The text itself goes to /dev/null.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from llm_jax.cli import main as cli_main


class _Clock:
    """A stdout that notes when each write happens (the first is the prompt's text)."""

    def __init__(self) -> None:
        self.writes: list[float] = []

    def write(self, text: str) -> int:
        self.writes.append(time.perf_counter())
        return len(text)

    def flush(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompt", default="def main(")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    argv = ["sample", "--checkpoint", args.checkpoint, "--prompt", args.prompt]
    argv += ["--max-new-tokens", str(args.max_new_tokens)]
    print(f"{'call':<6} {'first token ms':>15} {'whole call ms':>14}")
    for i in range(args.calls):
        clock = _Clock()
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            with contextlib.redirect_stdout(clock):
                start = time.perf_counter()
                code = cli_main(argv)
                end = time.perf_counter()
        if code != 0:
            raise SystemExit(f"llm-jax sample exited with {code}")
        first = (clock.writes[1] - start) * 1e3  # writes[0] is the prompt's text
        label = "cold" if i == 0 else "warm"
        print(f"{i + 1} {label:<4} {first:>15.1f} {(end - start) * 1e3:>14.1f}")


if __name__ == "__main__":
    main()
