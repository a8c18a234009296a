"""A device mesh with axes ('data', 'fsdp', 'tensor') and the rules that map the models'
logical axis names onto it (flax lm1b / t5x style). Shardings are derived from the logical
axes of an abstract model, never written per tensor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llm_jax.config import Config, one_of
from llm_jax.parallel.rules import logical_to_spec, unused_mesh_axes

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (or None = replicated). The batch is split over data and fsdp
# in every preset; FSDP additionally shards parameters (and so optimizer state) along their
# model dim; tensor parallelism splits heads, MLP hidden units and the vocabulary.
RULES: dict[str, dict[str, Any]] = {
    "dp": {"batch": BATCH_AXES},
    "fsdp": {"batch": BATCH_AXES, "embed": "fsdp"},
    "fsdp_tp": {
        "batch": BATCH_AXES,
        "embed": "fsdp",
        "heads": "tensor",
        "kv_heads": "tensor",
        "mlp": "tensor",
        "vocab": "tensor",
    },
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(Config):
    """Mesh shape and sharding rules. A size of -1 takes the devices left over."""

    section: ClassVar[str] = "mesh"

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: str = "dp"

    def __post_init__(self) -> None:
        one_of(self, "rules", sorted(RULES))
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes, strict=True))} must be positive, "
                "with at most one -1 (the remaining devices)."
            )

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"{num_devices} devices cannot be split into a mesh with fixed axes of "
                    f"total size {known}; choose fsdp * tensor dividing {num_devices}."
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} "
                f"devices but {num_devices} are available; make data * fsdp * tensor equal "
                f"{num_devices} (or set one of them to -1)."
            )
        return tuple(sizes)


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all of them)."""
    cfg = cfg or MeshConfig()
    devices = jax.devices() if devices is None else list(devices)
    shape = cfg.shape(len(devices))
    idle = unused_mesh_axes(dict(zip(MESH_AXES, shape, strict=True)), RULES[cfg.rules])
    if idle:
        sizes = ", ".join(f"{n}={shape[MESH_AXES.index(n)]}" for n in idle)
        warnings.warn(
            f"mesh axis {sizes} has no logical axis mapped to it under rules={cfg.rules!r}: "
            "its devices all repeat the same computation. Set that axis to 1 (and data=-1), "
            f"or use rules that shard over it ({_rules_using(idle)}).",
            UnusedMeshAxisWarning,
            stacklevel=2,
        )
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


class UnusedMeshAxisWarning(UserWarning):
    """A mesh axis of size > 1 that the sharding rules never use."""


def _rules_using(axes: list[str]) -> str:
    names = [
        name for name, rules in RULES.items() if not unused_mesh_axes(dict.fromkeys(axes, 2), rules)
    ]
    return " or ".join(f"rules={n!r}" for n in names) or "custom rules"


def logical_axes(model: nnx.Module) -> dict:
    """The logical axis names of every parameter, as a pure dict shaped like the params."""
    state = nnx.state(model, nnx.Param)
    axes = jax.tree.map(
        lambda v: v.get_metadata().get("out_sharding"),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.to_pure_dict(axes)


def logical_to_sharding(abstract_params, axes_tree, mesh: Mesh, rules: str | dict):
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs given their logical axes."""
    rules = RULES[rules] if isinstance(rules, str) else rules

    def one(x, axes):
        return NamedSharding(mesh, logical_to_spec(tuple(axes), x.shape, rules, mesh))

    return jax.tree.map(one, abstract_params, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def data_shards(mesh: Mesh, data_axes: Sequence[str] = BATCH_AXES) -> tuple[tuple[str, ...], int]:
    """The batch axes present in `mesh` and the number of batch shards they make."""
    present = tuple(a for a in data_axes if a in mesh.axis_names)
    if not present:
        raise ValueError(
            f"none of the data axes {list(data_axes)} is in the mesh axes "
            f"{list(mesh.axis_names)}; name the batch axes of this mesh in `data_axes`."
        )
    return present, math.prod(mesh.shape[a] for a in present)


def data_parallel_size(mesh: Mesh, data_axes: Sequence[str] = BATCH_AXES) -> int:
    """How many shards the batch is split into (the product of the present batch axes)."""
    return data_shards(mesh, data_axes)[1]


def batch_sharding(
    mesh: Mesh, ndim: int = 1, *, data_axes: Sequence[str] = BATCH_AXES
) -> NamedSharding:
    """Batch arrays [B, ...] split on their leading axis over the batch axes of `mesh`.

    Axes named in `data_axes` but absent from the mesh are left out, so the default
    ('data', 'fsdp') serves DP-only and FSDP meshes alike. `ndim` only spells out the
    replicated trailing axes of the spec; the sharding is the same for every rank.
    """
    present, _ = data_shards(mesh, data_axes)
    return NamedSharding(mesh, PartitionSpec(present, *([None] * (ndim - 1))))


def check_batch_size(
    batch_size: int,
    mesh: Mesh | None = None,
    data_axes: Sequence[str] = BATCH_AXES,
    process_count: int = 1,
) -> None:
    """ValueError unless the global batch divides over the mesh's batch shards and the hosts.

    The message names the sizes that would work.
    """
    need, why = process_count, f"{process_count} hosts"
    if mesh is not None:
        present, shards = data_shards(mesh, data_axes)
        sizes = ", ".join(f"{a}={mesh.shape[a]}" for a in present)
        need, why = math.lcm(shards, process_count), f"{shards} data shards ({sizes})"
        if process_count > 1:
            why += f" and {process_count} hosts"
    if batch_size % need:
        options = ", ".join(str(need * k) for k in range(1, 5))
        raise ValueError(
            f"DataConfig.batch_size={batch_size} does not divide evenly over {why}; use a "
            f"multiple of {need}, e.g. {options}."
        )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """`jax.distributed.initialize` from arguments or the standard environment variables.

    Reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID when the arguments
    are None; does nothing (returns False) for a single-process run. On TPU pods and SLURM
    clusters JAX discovers these itself: set `coordinator_address="auto"`.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    if coordinator_address is None:
        return False
    if coordinator_address == "auto":
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    log.info("process %d of %d", jax.process_index(), jax.process_count())
    return True


def describe(mesh: Mesh) -> str:
    return (
        " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
        + f" ({np.prod(mesh.devices.shape)} devices)"
    )
