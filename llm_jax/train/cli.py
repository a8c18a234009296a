"""`llm-jax train CONFIG.yaml [section.key=value ...]` and `llm-jax eval`."""

from __future__ import annotations

import argparse
import logging


def _train(args: argparse.Namespace) -> int:
    if args.config is None:
        args.parser.error("a CONFIG is required, e.g. llm-jax train configs/tiny.yaml")
    from llm_jax.train.config import load_config
    from llm_jax.train.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        usage="llm-jax train CONFIG [section.key=value ...]",
        help="pretrain or fine-tune from a YAML config",
        description="Train from a YAML run config (see configs/). Overrides use dotted keys, "
        "e.g. train.steps=100 optimizer.learning_rate=1e-3 data.paths=[my.txt]. Rerunning "
        "with the same workdir resumes from its latest checkpoint.",
    )
    # Optional to argparse so that a missing CONFIG gets its own message (argparse would
    # also call the overrides, which may be empty, "required").
    p.add_argument(
        "config", nargs="?", metavar="CONFIG", help="YAML run config, e.g. configs/tiny.yaml"
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides")
    p.set_defaults(func=_train, parser=p)
    logging.getLogger("absl").setLevel(logging.WARNING)
