"""Device meshes, logical-axis rules and multi-host initialisation."""

from llm_jax.parallel.mesh import (
    BATCH_AXES,
    MESH_AXES,
    RULES,
    MeshConfig,
    batch_sharding,
    check_batch_size,
    data_parallel_size,
    data_shards,
    describe,
    initialize_distributed,
    logical_axes,
    logical_to_sharding,
    make_mesh,
)
from llm_jax.parallel.rules import activation_sharding, constrain, logical_to_spec

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "RULES",
    "MeshConfig",
    "activation_sharding",
    "batch_sharding",
    "check_batch_size",
    "constrain",
    "data_parallel_size",
    "data_shards",
    "describe",
    "initialize_distributed",
    "logical_axes",
    "logical_to_sharding",
    "logical_to_spec",
    "make_mesh",
]
