"""Model inspection shared by every family: the parameter table and count."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx


def param_table(model: nnx.Module) -> str:
    """A table of every parameter: path, shape, logical axes, count; and the total."""
    rows = []
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = "/".join(str(p) for p in path)
        shape = tuple(var.get_value().shape)
        axes = var.get_metadata().get("out_sharding")
        n = int(np.prod(shape))
        total += n
        rows.append((name, str(shape), str(axes), f"{n:,}"))
    widths = [max(len(r[i]) for r in [("path", "shape", "axes", "count"), *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:3]) + f"  {{:>{widths[3]}}}"
    lines = [fmt.format("path", "shape", "axes", "count")]
    lines += [fmt.format(*r) for r in rows]
    lines.append(f"total parameters: {total:,}")
    return "\n".join(lines)


def count_params(tree) -> int:
    """Number of parameters in a module (its nnx.Param variables) or in a pytree of arrays."""
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree, nnx.Param)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
