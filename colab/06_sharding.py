# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Sharding: meshes, logical axes, and the same step on every layout
#
# Colab's free TPU is one v5e chip, so this notebook builds its device meshes from **8 fake
# CPU devices** (`jax_num_cpu_devices`): the sharding, the compiled collectives and the
# memory per device are exactly those XLA would produce on 8 real chips, only slower. The
# same code and config then run on a TPU pod slice, where `jax.distributed` joins the hosts.
#
# Expected run time (estimates; the work is compilation, not arithmetic): about 1 minute
# in smoke mode and 2–3 minutes at full size on any runtime (CPU, Colab TPU v5e or GPU),
# since every step below runs on the 8 CPU devices whatever accelerator is present.

# %%
# Install llm_jax (and jax for a TPU/GPU runtime) unless it is already importable.
import importlib.util
import os
import shutil
import subprocess
import sys

LLM_JAX_REPO = "https://github.com/llm-jax/llm_jax"
if importlib.util.find_spec("llm_jax") is None:
    if os.path.exists("/dev/accel0") or "TPU_ACCELERATOR_TYPE" in os.environ:
        extra = ["jax[tpu]>=0.10.2,<0.11"]
    elif shutil.which("nvidia-smi"):
        extra = ["jax[cuda12]>=0.10.2,<0.11"]
    else:
        extra = []
    pip = [sys.executable, "-m", "pip", "install", "-q", f"llm_jax @ git+{LLM_JAX_REPO}"]
    subprocess.run(pip + extra, check=True)

# %%
# 8 CPU devices. This must run before JAX computes anything (restart the runtime otherwise);
# the meshes below use jax.devices("cpu"), so a TPU/GPU runtime keeps its accelerator too.
import jax

jax.config.update("jax_num_cpu_devices", 8)

# %%
import numpy as np

import llm_jax as lj
from llm_jax import notebook as nb
from llm_jax.parallel import RULES, MeshConfig, describe, logical_to_spec, make_mesh
from llm_jax.train import plan as plan_lib
from llm_jax.train.config import config_from_dict

nb.show_devices()
cpus = jax.devices("cpu")
print(f"{len(cpus)} CPU devices:", cpus)
assert len(cpus) == 8, "restart the runtime: JAX started before jax_num_cpu_devices was set"

# %% [markdown]
# ## Mesh and logical axis rules
#
# A **mesh** arranges the devices in a named grid; ours always has the axes
# `('data', 'fsdp', 'tensor')`. Every parameter of every model carries **logical** axis
# names (`vocab`, `embed`, `heads`, `mlp`, `layers`, ...), and a **rules preset** maps
# logical names to mesh axes:
#
# - `dp` (data parallel): only the batch is split (over `data` × `fsdp`); every device
#   holds all parameters and optimizer state, and the gradients are all-reduced.
# - `fsdp` (fully sharded data parallel, ZeRO-3): the batch as in `dp`, and every `embed`
#   dimension split over `fsdp` — each device stores $1/n$ of the parameters and optimizer
#   state; a layer's weights are all-gathered just before it runs.
# - `fsdp_tp`: `fsdp` plus tensor (Megatron) parallelism: attention heads, MLP hidden units
#   and the vocabulary split over `tensor`, so $Y = XW$ with $W = [W_1 \,|\, W_2]$ is computed
#   as $[XW_1 \,|\, XW_2]$ on two devices.
#
# A dimension stays replicated when its mesh axes do not divide it, or when an earlier
# dimension of the same array already uses them.

# %%
logical = sorted({axis for rules in RULES.values() for axis in rules})
print(
    nb.table(
        [{"logical axis": a, **{p: str(r.get(a, "-")) for p, r in RULES.items()}} for a in logical]
    )
)
print("(any other logical axis, e.g. layers, length, kv: replicated under every preset)")

LAYOUTS = {
    "dp": MeshConfig(data=8, rules="dp"),
    "fsdp": MeshConfig(data=2, fsdp=4, rules="fsdp"),
    "fsdp_tp": MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"),
}
meshes = {name: make_mesh(mc, cpus) for name, mc in LAYOUTS.items()}
for name, mesh in meshes.items():
    print(
        f"{name:8s} mesh {describe(mesh)}; device ids:\n",
        mesh.device_ids.squeeze(),
    )

mesh = meshes["fsdp_tp"]
for axes, shape in [
    (("batch", "length", "embed"), (16, 64, 128)),
    (("embed", "mlp"), (128, 512)),
    (("vocab", "embed"), (256, 128)),
    (("layers", "embed", "heads", "kv"), (2, 128, 4, 32)),
    (("embed", "heads", "kv"), (128, 3, 32)),  # 3 heads do not split over tensor=2
]:
    print(f"{axes!s:40s} {shape!s:18s} -> {logical_to_spec(axes, shape, RULES['fsdp_tp'], mesh)}")

# %% [markdown]
# ## Parameter shardings
#
# The shardings come from an *abstract* initialisation (shapes only, no memory), then the
# parameters are initialised directly into them: no device ever holds the whole model
# first. `jax.debug.visualize_array_sharding` draws which device holds which block of a 2-D
# array: the token embedding `[vocab, embed]` and the first layer's MLP input kernel
# `[embed, mlp]` of a small GPT under each preset.

# %%
model_section = {
    "preset": "gpt2-tiny",
    "vocab_size": 256,  # bytes: the text below is read as UTF-8 bytes
    "d_model": nb.pick(smoke=64, full=256),
    "num_layers": nb.pick(smoke=2, full=4),
    "num_heads": 4,
    "d_ff": nb.pick(smoke=256, full=1024),
    "max_position_embeddings": 128,
}
seq_len, batch_size = nb.pick(smoke=32, full=128), 16
LR = 1e-3


def run_config(mesh_config: MeshConfig):
    """The run config of this notebook on one mesh layout (what `llm-jax train` reads)."""
    return config_from_dict(
        {
            "name": "sharding",
            "workdir": "runs/sharding",
            "model": model_section,
            "data": {"vocab_size": 256, "seq_len": seq_len, "batch_size": batch_size},
            "train": {"steps": 100},
            "optimizer": {"name": "adamw", "learning_rate": LR, "warmup_steps": 0},
            "mesh": mesh_config.to_dict(),
        }
    )


# compile_plan compiles (never runs) the real train step of `llm-jax train` for the devices
# given and measures it; its steps are reused below to run that same step.
plans, compiled = {}, {}
for name, mesh_config in LAYOUTS.items():
    plans[name], compiled[name] = plan_lib.compile_plan(run_config(mesh_config), cpus, None)
states = {name: steps.init() for name, steps in compiled.items()}

for name, state in states.items():
    emb = state.params["embed"]["embedding"]
    wi = state.params["layers"]["blocks"]["mlp"]["wi"]["kernel"]
    print(f"=== {name}: embed/embedding {emb.shape} {emb.sharding.spec}")
    jax.debug.visualize_array_sharding(emb)
    print(f"=== {name}: layer 0 mlp/wi/kernel {wi.shape[1:]} {wi.sharding.spec}")
    jax.debug.visualize_array_sharding(wi[0])

# %%
rows = []
for path, shape, _, _, _ in plans["dp"].param_table:
    row = {"parameter": path, "shape": str(shape)}
    for name, plan in plans.items():
        row[f"{name} spec"] = {r[0]: r[3] for r in plan.param_table}[path]
    rows.append(row)
print(nb.table(rows))

# %% [markdown]
# ## Memory per device
#
# The compiled step's `memory_analysis()` counts, per device, its arguments (parameters,
# AdamW's two moments, the batch), its outputs (the new state: donated, so aliased onto the
# arguments), and the temporaries (activations kept for the backward pass, gradients,
# gathered weights). `llm-jax plan CONFIG` prints the same numbers before a launch; with
# `--topology v5e-8` (and `libtpu` installed) it plans a TPU slice from any machine.
#
# Under `dp` the parameters and optimizer state are whole on every device; `fsdp` divides
# them by the `fsdp` size; `fsdp_tp` by `fsdp × tensor` for the tensors it can split both
# ways. Activations shrink with the per-device batch (`batch / (data × fsdp)`).

# %% tags=["plot"]
import matplotlib.pyplot as plt

kinds = ["params", "opt_state", "batch", "temporaries"]
mib = {name: [getattr(p, k) / 2**20 for k in kinds] for name, p in plans.items()}
print(
    nb.table(
        [
            {"layout": n, **dict(zip(kinds, v, strict=True)), "total": plans[n].total / 2**20}
            for n, v in mib.items()
        ]
    )
)
print("(MiB per device; total = arguments + outputs - aliased + temporaries + code)")
for name, plan in plans.items():  # the plan's numbers are the compiled step's own analysis
    memory = compiled[name].memory  # `memory_analysis()` of the compiled train step
    assert plan.temporaries == memory.temp_size_in_bytes
    assert plan.arguments == memory.argument_size_in_bytes

fig, ax = plt.subplots(figsize=(7, 3.5))
bottom = np.zeros(len(plans))
for i, kind in enumerate(kinds):
    values = np.array([mib[n][i] for n in plans])
    ax.bar(list(plans), values, bottom=bottom, label=kind)
    bottom += values
ax.set(ylabel="MiB per device", title="compiled train step, 8 devices")
ax.legend()
plt.show()

print(plan_lib.report(plans["fsdp_tp"], "local (8 x cpu)", None).split("parameters (")[0])

# %% [markdown]
# ## Same numbers on every layout
#
# Sharding changes where the arithmetic happens, not what it computes: the loss and the
# global gradient norm $\lVert g \rVert_2$ of every step agree across layouts up to
# floating-point summation order. Below, three AdamW steps on the same batch of real text
# (UTF-8 bytes as tokens), on one device and on each layout, each from the same seed.
#
# The weights are compared through the update they received, $\Delta w = w_3 - w_0$: AdamW
# divides each gradient coordinate by its own running RMS, $\Delta w = -\eta\, \hat m /
# (\sqrt{\hat v} + \epsilon)$, so a coordinate whose gradient is almost zero moves by a
# sizeable fraction of $\eta$ in a direction set by rounding noise; elementwise the weights
# then differ by ~1 % of $\eta$ in a few places, while the update as a whole agrees to
# $< 10^{-4}$. (With SGD every weight matches to $10^{-5}$, which
# `tests/test_train.py::test_sharded_equals_single_device` checks.)

# %%
path = nb.find_data("tinyshakespeare.txt", "shakespeare.txt")
text = path.read_bytes() if path is not None else open(os.__file__, "rb").read()
data = np.frombuffer(text[: batch_size * (seq_len + 1)], np.uint8).astype(np.int32)
rows = data.reshape(batch_size, seq_len + 1)
segments = np.ones_like(rows)
positions = np.broadcast_to(np.arange(seq_len + 1, dtype=np.int32), rows.shape)
batch = lj.data.clm_batch(rows, segments, positions)

one = MeshConfig(data=1, rules="dp")
plans["1 device"], compiled["1 device"] = plan_lib.compile_plan(run_config(one), cpus[:1], None)
states["1 device"] = compiled["1 device"].init()

n_steps = 3
start = jax.device_get(states["1 device"].params)  # the same seed: the same start everywhere
history = {}
for name, steps in compiled.items():
    state, history[name] = states[name], []
    placed = steps.layout.put_batch(batch)  # split over this mesh's batch axes
    for _ in range(n_steps):
        state, metrics = steps.train(state, placed)  # the state is donated: keep the new one
        history[name].append({k: float(metrics[k]) for k in ("loss", "grad_norm")})
    states[name] = state


def global_norm(tree) -> float:
    return float(
        np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree)))
    )


ref = jax.device_get(states["1 device"].params)
update = global_norm(jax.tree.map(np.subtract, ref, start))
table = []
for step in range(n_steps):
    for key in ("loss", "grad_norm"):
        values = {name: f"{history[name][step][key]:.7f}" for name in compiled}
        table.append({"step": step + 1, "metric": key, **values})
drift = {}
for name in LAYOUTS:
    got = jax.device_get(states[name].params)
    drift[name] = global_norm(jax.tree.map(np.subtract, got, ref)) / update
drift_row = {k: f"{v:.1e}" for k, v in drift.items()}
table.append({"step": n_steps, "metric": "‖Δw − Δw₁‖ / ‖Δw₁‖", **drift_row, "1 device": "0"})
print(nb.table(table))

for name in LAYOUTS:
    for r, g in zip(history["1 device"], history[name], strict=True):
        np.testing.assert_allclose(
            [g["loss"], g["grad_norm"]], [r["loss"], r["grad_norm"]], rtol=1e-5
        )
    assert drift[name] < 1e-4, (name, drift[name])
print("every layout matches one device: loss and grad norm to rtol 1e-5, updates to 0.01 %")

# %% [markdown]
# ## TPU pod slices and jax.distributed
#
# A pod slice (say `v5e-16`: 4 hosts × 4 chips) runs **one Python process per host**, each
# seeing only its own 4 chips until `jax.distributed.initialize()` joins them; then
# `jax.devices()` lists all 16, a mesh spans the hosts, and `jax.jit` inserts the
# collectives between them exactly as it did between the fake devices above. Each process
# feeds only its hosts' rows of the global batch (`llm_jax.data.host_slice`), so
# `data.batch_size` must divide over the data shards *and* the hosts.
#
# The same config runs there unchanged: `configs/gpt2_small.yaml` already asks for
# `mesh.fsdp=-1` (all devices, of all hosts) with `rules: fsdp`. What changes is that every
# host starts the same command, with the checkout and the corpus at the same path on each,
# and `workdir` on a filesystem they all share (each host writes its own shards of every
# checkpoint):
#
# ```bash
# # a TPU VM slice: every worker at once; "auto" lets JAX find the coordinator itself
# gcloud compute tpus tpu-vm ssh my-v5e-16 --zone=us-west4-a --worker=all --command='
#   cd llm_jax && pip install -q -e . "jax[tpu]>=0.10.2,<0.11" &&
#   llm-jax train configs/gpt2_small.yaml distributed.coordinator_address=auto \
#       workdir=/mnt/shared/runs/gpt2_small'
# # elsewhere (GPU hosts, CPUs): name the coordinator and each process's rank
# JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=$RANK \
#   llm-jax train configs/gpt2_small.yaml workdir=/mnt/shared/runs/gpt2_small
# # mixing the layouts of this notebook: data parallel over 4 groups of 4 FSDP shards
# llm-jax train configs/gpt2_small.yaml distributed.coordinator_address=auto \
#   mesh.data=4 mesh.fsdp=4 mesh.rules=fsdp
# ```
#
# The config keys are `distributed.coordinator_address` (`auto` on TPU VMs and SLURM),
# `distributed.num_processes` and `distributed.process_id` (or the `JAX_*` variables above),
# and `mesh.data` / `mesh.fsdp` / `mesh.tensor` / `mesh.rules`. All chips of one slice
# share the ICI interconnect, so every layout above works within a slice; `tensor` talks
# every layer and `fsdp` gathers every layer's weights, while `data` reduces the gradients
# once a step, so `data` is the axis to stretch over slower links. Before launching,
# `llm-jax plan CONFIG --topology v5e-8` compiles the step with XLA's TPU compiler from any
# machine with `libtpu` installed and says whether it fits the 16 GB of each chip; the cell
# below checks a batch size against the hosts, and plans a v5e-8 when `libtpu` is present.

# %%
from llm_jax.parallel import check_batch_size

for b, hosts in [(64, 4), (20, 4)]:
    try:
        check_batch_size(b, meshes["fsdp"], process_count=hosts)
        print(f"data.batch_size={b} over {describe(meshes['fsdp'])} and {hosts} hosts: ok")
    except ValueError as e:
        print(f"data.batch_size={b}: {e}")

if importlib.util.find_spec("libtpu") is not None:
    devices, hbm = plan_lib.topology_devices("v5e-8")
    cfg = run_config(MeshConfig(data=-1, rules="dp"))
    tpu_plan, _ = plan_lib.compile_plan(cfg, devices, hbm)
    print(plan_lib.report(tpu_plan, "v5e-8", None).split("parameters (")[0])
else:
    print(
        "libtpu not installed: `llm-jax plan --topology v5e-8` skipped here "
        "(pip install 'libtpu==0.0.42.*' to plan a TPU slice from this machine)"
    )
