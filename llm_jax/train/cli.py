"""`llm-jax train CONFIG.yaml [section.key=value ...]`.

Exit codes: 0 when the run reached `train.steps` (or already had); 128 + the signal number
when SIGTERM (143) or SIGINT/Ctrl-C (130) stopped it, after saving the current step, or
during start-up, before there was anything to save; 2 for a bad config, 1 for a
non-finite loss (see `llm_jax.cli`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _train(args: argparse.Namespace) -> int:
    if args.config is None:
        args.parser.error("a CONFIG is required, e.g. llm-jax train configs/tiny.yaml")
    # The signal handling goes in before the slow start-up (the training modules' imports,
    # tokenizer training, init, compile) so that Ctrl-C there ends in one line.
    from llm_jax.train.hooks import Interrupted, StopOnSignal

    try:
        with StopOnSignal():
            from llm_jax.models.elmo_train import is_elmo_config, run_command

            elmo = is_elmo_config(args.config)
            if not elmo:
                from llm_jax.train.config import load_config
                from llm_jax.train.loop import train

                cfg = load_config(args.config, args.overrides)
        if elmo:  # model.family: elmo, ELMo's own trainer (the same signal handling)
            return run_command(args.config, args.overrides)
        # `train` installs its own handling at once (saving once steps run); the outer one
        # must not outlive the run and call a signal after the last save "start-up".
        result = train(cfg)
    except Interrupted as e:
        print(
            f"llm-jax train: interrupted by signal {e.signum} during start-up; nothing was "
            "saved, rerun to start again.",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        # Exit at once: an interpreter teardown with half-imported modules and the
        # runtime's threads still starting has crashed (exit 139) after such an interrupt.
        os._exit(128 + e.signum)
    return 0 if result.interrupted is None else 128 + result.interrupted


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        usage="llm-jax train CONFIG [section.key=value ...]",
        help="pretrain or fine-tune from a YAML config",
        description="Train from a YAML run config (see configs/). Overrides use dotted keys, "
        "e.g. train.steps=100 optimizer.learning_rate=1e-3 data.paths=[my.txt]. Rerunning "
        "with the same workdir resumes from its latest checkpoint. SIGTERM or Ctrl-C saves "
        "the current step and exits with 128 + the signal number (143, 130).",
    )
    # Optional to argparse so that a missing CONFIG gets its own message (argparse would
    # also call the overrides, which may be empty, "required").
    p.add_argument(
        "config", nargs="?", metavar="CONFIG", help="YAML run config, e.g. configs/tiny.yaml"
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides")
    p.set_defaults(func=_train, parser=p)
    logging.getLogger("absl").setLevel(logging.WARNING)
