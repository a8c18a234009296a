"""Logical axis names -> mesh axes, and activation sharding constraints.

This module imports nothing else of llm_jax, so the models can use `constrain` without
depending on the rest of the parallel package. Outside an `activation_sharding` context
`constrain` is the identity: models run unchanged on one device.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict[str, Any]] | None] = contextvars.ContextVar(
    "llm_jax_activation_sharding", default=None
)


def _mesh_names(mesh_axis) -> tuple[str, ...]:
    if mesh_axis is None:
        return ()
    return mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,)


def logical_to_spec(
    axes: tuple[str | None, ...], shape: tuple[int, ...], rules: dict[str, Any], mesh: Mesh
) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`.

    A dim whose mesh axes do not divide it, or whose mesh axis an earlier dim already uses,
    stays replicated (so tiny models and odd head counts still shard what they can).
    """
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape, strict=True):
        names = tuple(n for n in _mesh_names(rules.get(name)) if mesh.shape.get(n, 1) > 1)
        if not names or used & set(names) or size % math.prod(mesh.shape[n] for n in names):
            spec.append(None)
            continue
        used |= set(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def unused_mesh_axes(mesh_shape: dict[str, int], rules: dict[str, Any]) -> list[str]:
    """Mesh axes of size > 1 that no logical axis maps to.

    Every array is replicated along such an axis, so its devices all repeat the same work
    (e.g. `tensor=8` with data-parallel rules computes the whole step 8 times).
    """
    used = {n for axis in rules.values() for n in _mesh_names(axis)}
    return [n for n, size in mesh_shape.items() if size > 1 and n not in used]


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: dict[str, Any]) -> Iterator[None]:
    """Within this context (while tracing), `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """`with_sharding_constraint` by logical axis names; the identity outside a context."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(axes, x.shape, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_mesh_and_rules() -> tuple[Mesh, dict[str, Any]] | None:
    """The (mesh, rules) of the enclosing `activation_sharding` context, or None outside one
    (kernels that XLA cannot partition wrap themselves in `shard_map` over this mesh)."""
    return _ACTIVE.get()
