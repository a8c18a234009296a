"""Mesh construction: a mesh axis that no sharding rule uses is reported, not silently
replicated."""

import warnings

import pytest

from llm_jax.parallel.mesh import RULES, MeshConfig, UnusedMeshAxisWarning, make_mesh
from llm_jax.parallel.rules import unused_mesh_axes


def test_unused_mesh_axes_literal_cases():
    shape = {"data": 1, "fsdp": 1, "tensor": 8}
    assert unused_mesh_axes(shape, RULES["dp"]) == ["tensor"]
    assert unused_mesh_axes(shape, RULES["fsdp"]) == ["tensor"]
    assert unused_mesh_axes(shape, RULES["fsdp_tp"]) == []
    assert unused_mesh_axes({"data": 2, "fsdp": 4, "tensor": 1}, RULES["dp"]) == []


def test_tensor_axis_under_dp_rules_warns_with_the_fix():
    with pytest.warns(UnusedMeshAxisWarning, match=r"tensor=8 .*rules='fsdp_tp'"):
        make_mesh(MeshConfig(tensor=8, rules="dp"))


@pytest.mark.parametrize(
    "cfg",
    [MeshConfig(), MeshConfig(fsdp=8, rules="dp"), MeshConfig(fsdp=2, tensor=4, rules="fsdp_tp")],
)
def test_meshes_whose_axes_all_work_do_not_warn(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnusedMeshAxisWarning)
        make_mesh(cfg)
