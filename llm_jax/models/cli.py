"""`llm-jax model`: inspect presets (parameter tables) and run a forward pass on real text."""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llm_jax.models import build, count_params, param_table
from llm_jax.models.config import ModelConfig


def _show(args: argparse.Namespace) -> int:
    cfg = ModelConfig.preset(args.preset)
    model = nnx.eval_shape(lambda: build(cfg, rngs=nnx.Rngs(0)))
    print(
        param_table(model) if args.table else f"{args.preset}: {count_params(model):,} parameters"
    )
    return 0


def _forward(args: argparse.Namespace) -> int:
    """Byte-level forward pass of a freshly initialised model over a real text file."""
    cfg = ModelConfig.preset(args.preset)
    if cfg.vocab_size < 256:
        raise ValueError(f"preset {args.preset} has fewer than 256 ids; pick another preset.")
    text = open(args.text, "rb").read()[: args.length * args.batch]
    if len(text) < args.length * args.batch:
        raise ValueError(f"{args.text} has fewer than {args.length * args.batch} bytes.")
    tokens = jnp.asarray(np.frombuffer(text, np.uint8).reshape(args.batch, args.length), jnp.int32)
    model = build(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_fn(state, tokens):
        from llm_jax import ops

        model = nnx.merge(graphdef, state)
        if cfg.family == "t5":
            logits = model(tokens, tokens)
        else:
            logits = model(tokens)
        total, count = ops.cross_entropy(logits[:, :-1], tokens[:, 1:])
        return total / count

    t0 = time.perf_counter()
    loss = float(loss_fn(state, tokens))
    t1 = time.perf_counter()
    loss = float(loss_fn(state, tokens))
    t2 = time.perf_counter()
    print(f"{args.preset}: {count_params(model):,} parameters")
    print(
        f"next-byte loss of the untrained model on {args.text}: {loss:.4f} "
        f"(uniform would be {np.log(cfg.vocab_size):.4f})"
    )
    print(
        f"compile+run {t1 - t0:.2f} s, run {t2 - t1:.3f} s, {tokens.size / (t2 - t1):,.0f} tokens/s"
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="inspect model presets and run a forward pass")
    msub = p.add_subparsers(dest="model_command", required=True)
    show = msub.add_parser("show", help="parameter count or table of a preset")
    show.add_argument("preset", choices=ModelConfig.preset_names())
    show.add_argument("--table", action="store_true", help="print every parameter")
    show.set_defaults(func=_show)
    fwd = msub.add_parser("forward", help="forward pass over a text file (bytes as tokens)")
    fwd.add_argument("--preset", default="gpt2-tiny", choices=ModelConfig.preset_names())
    fwd.add_argument("--text", default=None, help="a text file (default: this module)")
    fwd.add_argument("--batch", type=int, default=4)
    fwd.add_argument("--length", type=int, default=128)
    fwd.add_argument("--seed", type=int, default=0)
    fwd.set_defaults(
        func=lambda a: _forward(
            a if a.text else argparse.Namespace(**{**vars(a), "text": __file__})
        )
    )
