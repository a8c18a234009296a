"""Device meshes, logical-axis rules and multi-host initialisation."""

from llm_jax.parallel.mesh import (
    MESH_AXES,
    RULES,
    MeshConfig,
    batch_sharding,
    data_parallel_size,
    describe,
    initialize_distributed,
    logical_axes,
    logical_to_sharding,
    make_mesh,
)

__all__ = [
    "MESH_AXES",
    "RULES",
    "MeshConfig",
    "batch_sharding",
    "data_parallel_size",
    "describe",
    "initialize_distributed",
    "logical_axes",
    "logical_to_sharding",
    "make_mesh",
]
