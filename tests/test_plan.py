"""`llm-jax plan`: the memory plan equals the compiled train step's memory analysis on 8
fake CPU devices, a config over its memory is told so with a change that fits, and TPU
targets need libtpu (planned for real where it is installed)."""

import jax
import numpy as np
import pytest

from llm_jax.cli import main
from llm_jax.parallel.mesh import make_mesh
from llm_jax.parallel.rules import activation_sharding
from llm_jax.train import plan as plan_lib
from llm_jax.train.compile import compile_steps, state_layout
from llm_jax.train.config import load_config

CONFIG = """\
name: plan_test
workdir: {workdir}
model:
  preset: gpt2-tiny
  vocab_size: 256
  d_model: 32
  num_layers: 2
  num_heads: 2
  d_ff: 64
  max_position_embeddings: 64
  remat_policy: full
data:
  seq_len: 64
  batch_size: 16
  vocab_size: 256
train:
  steps: 10
mesh:
  data: 1
  fsdp: -1
  rules: fsdp
"""


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    path = d / "plan.yaml"
    path.write_text(CONFIG.format(workdir=d / "run"))
    return path


@pytest.fixture(scope="module")
def planned(config_path):
    cfg = load_config(config_path)
    return cfg, *plan_lib.compile_plan(cfg, jax.devices(), None)


def test_plan_equals_the_compiled_steps_memory(planned):
    cfg, plan, _ = planned
    assert len(jax.devices()) == 8 and plan.mesh == {"data": 1, "fsdp": 8, "tensor": 1}
    # The training path: a real (numpy) batch put on the mesh, as `llm-jax train` does.
    layout = state_layout(
        cfg.model_config(256),
        cfg.optimizer,
        make_mesh(cfg.mesh),
        total_steps=10,
        rules="fsdp",
    )
    batch = {k: np.zeros(v.shape, v.dtype) for k, v in plan_lib.abstract_batch(cfg).items()}
    with activation_sharding(layout.mesh, layout.rules):
        mem = compile_steps(layout, "clm", layout.put_batch(batch)).memory
    assert plan.arguments == mem.argument_size_in_bytes
    assert plan.outputs == mem.output_size_in_bytes
    assert plan.aliased == mem.alias_size_in_bytes
    assert plan.temporaries == mem.temp_size_in_bytes > 0
    assert plan.code == mem.generated_code_size_in_bytes
    # The inputs by kind add up to what the compiler counts as arguments.
    assert plan.params + plan.opt_state + plan.batch + plan.other == plan.arguments
    assert plan.fits is None  # CPU devices report no memory limit
    table = {row[0]: row for row in plan.param_table}
    _, shape, dtype, spec, nbytes = table["embed/embedding"]
    assert shape == (256, 32) and dtype == "float32" and "fsdp" in spec
    assert nbytes == 256 * 32 * 4 // 8  # sharded 8 ways
    assert sum(row[4] for row in plan.param_table) == plan.params


def test_over_the_limit_does_not_fit_and_a_suggestion_does(planned, config_path, capsys):
    _, plan, _ = planned
    hbm_gib = 0.9 * plan.total / plan_lib.GIB
    code = main(["plan", str(config_path), "--hbm-gib", str(hbm_gib), "--max-tries", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "-> does not fit" in out
    # remat is already full: the first candidate is two micro-batches, which halve the
    # activations and so fit under 90% of the total.
    assert "suggestion: train.grad_accum_steps=2 (total" in out and "fits)" in out
    assert "embed/embedding" in out


def test_tpu_topology_needs_libtpu_or_plans_it(config_path, capsys):
    if plan_lib.importlib.util.find_spec("libtpu") is None:
        assert main(["plan", str(config_path), "--topology", "v5e-8"]) == 2
        assert "pip install 'libtpu==0.0.42.*'" in capsys.readouterr().err
        return
    devices, hbm = plan_lib.topology_devices("v5e-8")
    assert len(devices) == 8 and hbm == 16 * plan_lib.GIB
    plan, _ = plan_lib.compile_plan(load_config(config_path), devices, hbm)
    assert plan.fits and plan.temporaries > 0
