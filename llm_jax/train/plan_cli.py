"""`llm-jax plan CONFIG.yaml [section.key=value ...] [--topology NAME] [--hbm-gib X]`.

Compiles (never runs) the config's train step for the target devices and prints the
per-device memory plan (see `llm_jax.train.plan`). Exit code 0 when it fits (or the HBM
is unknown), 1 when it does not.
"""

from __future__ import annotations

import argparse
import logging


def _plan(args: argparse.Namespace) -> int:
    if args.config is None:
        args.parser.error("a CONFIG is required, e.g. llm-jax plan configs/gpt2_small.yaml")
    if args.hbm_gib is not None and args.hbm_gib <= 0:
        raise ValueError(f"--hbm-gib must be positive, got {args.hbm_gib}.")
    from llm_jax.train import plan as plan_lib
    from llm_jax.train.config import load_config

    cfg = load_config(args.config, args.overrides)
    devices, hbm = plan_lib.topology_devices(args.topology)
    if args.hbm_gib is not None:
        hbm = args.hbm_gib * plan_lib.GIB
    plan, _ = plan_lib.compile_plan(cfg, devices, hbm)
    suggestion = None
    if plan.fits is False and not args.no_suggest:
        suggestion = plan_lib.suggest(cfg, devices, hbm, limit=args.max_tries)
    target = f"{args.topology} ({len(devices)} x {devices[0].device_kind})"
    print(plan_lib.report(plan, target, suggestion))
    return 1 if plan.fits is False else 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        usage="llm-jax plan CONFIG [section.key=value ...] [--topology NAME] [--hbm-gib X]",
        help="compile the train step for a target and print its memory per device",
        description="Compile (never run) the train step of a YAML run config for a target "
        "and print per device: parameters, optimizer state, batch, compiled temporaries, "
        "total, the chip's HBM and whether it fits, with the smallest change that makes a "
        "non-fitting config fit, and each parameter's sharding. TPU topologies compile on "
        "any machine with libtpu installed (pip install 'libtpu==0.0.42.*').",
    )
    from llm_jax.train.plan import TOPOLOGY_CHOICES

    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML run config")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides")
    p.add_argument(
        "--topology",
        default="local",
        choices=TOPOLOGY_CHOICES,
        help="target devices: a TPU slice, or local (the devices present; default)",
    )
    p.add_argument(
        "--hbm-gib",
        type=float,
        default=None,
        help="memory per device in GiB (overrides the chip's)",
    )
    p.add_argument(
        "--no-suggest", action="store_true", help="do not recompile candidates when it does not fit"
    )
    p.add_argument(
        "--max-tries", type=int, default=4, help="candidate changes to recompile at most"
    )
    p.set_defaults(func=_plan, parser=p)
    logging.getLogger("absl").setLevel(logging.WARNING)
