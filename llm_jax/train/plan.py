"""A memory plan before launch: compile (never run) the real train step for a target and
read its per-device memory from the compiled program.

The step is the one `llm-jax train` runs: `state_layout` and `compile_steps` with a batch of
`jax.ShapeDtypeStruct`s (no data is read, no tokenizer trained, nothing allocated). For a
TPU slice the devices are a TPU topology description (`jax.experimental.topologies`), so
XLA's TPU compiler plans the program on any machine, as MaxText's `train_compile.py` does;
that needs `libtpu` importable (`pip install 'libtpu==0.0.42.*'`, the version jax 0.10.2
pins for its `[tpu]` extra). `local` plans for the devices present.

When the step does not fit the chip's HBM, the plan recompiles a few single changes,
smallest first (a stronger remat policy, FSDP over the data-parallel devices, more
gradient-accumulation micro-batches, a smaller batch), and names the first that fits.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

import jax
import numpy as np

from llm_jax.data.objectives import objective_spec
from llm_jax.models.attention_impl import recording_used, resolve, target_platform
from llm_jax.parallel.mesh import MeshConfig, batch_sharding, make_mesh
from llm_jax.parallel.rules import activation_sharding
from llm_jax.train.compile import compile_steps, state_layout
from llm_jax.train.config import RunConfig
from llm_jax.train.step import LossConfig

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as `get_topology_desc` names it, and its chip's HBM per device."""

    topology_name: str
    chip_config_name: str
    chips_per_host_bounds: tuple[int, int, int]
    hbm_gib: float


# Names and layouts as MaxText's accelerator_to_spec_map; HBM per chip from the Cloud TPU
# system-architecture pages (v4 and v5p run megacore: one device per chip).
TOPOLOGIES = {
    "v5e-1": Topology("v5e:1x1", "default", (1, 1, 1), 16),
    "v5e-8": Topology("v5e:2x4", "default", (2, 2, 1), 16),
    "v5p-8": Topology("v5p:2x2x1", "megacore", (2, 2, 1), 95),
    "v4-8": Topology("v4:2x2x1", "megacore", (2, 2, 1), 32),
    "v6e-8": Topology("v6e:2x4", "default", (2, 2, 1), 32),
}
TOPOLOGY_CHOICES = ("local", *TOPOLOGIES)
# The order remat policies save less (and recompute more) in.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")


def topology_devices(name: str) -> tuple[list[Any], float | None]:
    """The devices of topology `name` and their HBM in bytes (None when unknown).

    `local`: `jax.devices()`, the HBM from the first device's memory stats (none on CPU).
    A TPU name: the devices of its topology description (needs libtpu, not TPU hardware).
    """
    if name == "local":
        devices = jax.devices()
        stats = devices[0].memory_stats() or {}
        return devices, stats.get("bytes_limit")
    if name not in TOPOLOGIES:
        raise ValueError(f"--topology {name!r} is not one of {list(TOPOLOGY_CHOICES)}.")
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(
            f"planning for {name} compiles with XLA's TPU compiler, which comes with libtpu: "
            "pip install 'libtpu==0.0.42.*' (the version jax 0.10.2 pins), or use "
            "--topology local."
        )
    from jax.experimental import topologies

    topo = TOPOLOGIES[name]
    desc = topologies.get_topology_desc(
        topology_name=topo.topology_name,
        platform="tpu",
        chip_config_name=topo.chip_config_name,
        chips_per_host_bounds=topo.chips_per_host_bounds,
        num_slices=1,
    )
    return list(desc.devices), topo.hbm_gib * GIB


def abstract_batch(cfg: RunConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The train batch of `cfg`'s objective as shapes (the contract of
    `llm_jax.data.objectives`): B = data.batch_size, T = seq_len, S = the decoder length."""
    d = cfg.data
    spec = objective_spec(d.objective)  # ValueError for an unknown objective
    b, t = d.batch_size, d.seq_len
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)

    def fields(prefix: str, length: int, names: tuple[str, ...]) -> dict[str, Any]:
        return {
            prefix + n: jax.ShapeDtypeStruct((b, length), f32 if n == "weights" else i32)
            for n in names
        }

    row = ("tokens", "targets", "weights", "segment_ids", "positions")
    if spec.name in ("clm", "instruct"):
        return fields("", t, row)
    if spec.name == "mlm":
        out = fields("", t, (*row, "token_type_ids"))
        if d.pair_task != "none":  # NSP / SOP: one label per row
            out["nsp_labels"] = jax.ShapeDtypeStruct((b,), i32)
            out["nsp_weights"] = jax.ShapeDtypeStruct((b,), f32)
        return out
    if spec.name == "classification":
        out = fields("", t, ("tokens", "token_type_ids", "segment_ids", "positions"))
        out["labels"] = jax.ShapeDtypeStruct((b,), i32)
        out["label_weights"] = jax.ShapeDtypeStruct((b,), f32)
        return out
    if spec.name in ("seq2seq", "span_corruption") and d.target_seq_len is not None:
        encoder = fields("encoder_", t, ("tokens", "segment_ids", "positions"))
        return {**encoder, **fields("decoder_", d.target_seq_len, row)}
    raise ValueError(
        f"llm-jax plan does not derive the batch of data.objective={d.objective} "
        "here; set data.target_seq_len for seq2seq/span_corruption, or plan a clm, instruct, "
        "mlm or classification config."
    )


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one compiled train step.

    Attributes:
      params, opt_state, batch, other: the step's inputs by kind (other: step, rng).
      arguments, outputs, aliased, temporaries, code: `compiled.memory_analysis()`.
      total: arguments + outputs - aliased + temporaries + code (what must be resident).
      hbm: the device's memory (None when unknown).
      param_table: (path, shape, dtype, sharding spec, bytes per device) of each parameter.
      mesh: the mesh's axis sizes.
      attention: the attention implementation the step was compiled with.
    """

    params: int
    opt_state: int
    batch: int
    other: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    hbm: float | None
    param_table: tuple[tuple[str, tuple[int, ...], str, str, int], ...]
    mesh: dict[str, int]
    attention: str = "xla"

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @property
    def fits(self) -> bool | None:
        return None if self.hbm is None else self.total <= self.hbm


def _device_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of `x`."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def _tree_bytes(tree: Any) -> int:
    return sum(_device_bytes(x) for x in jax.tree.leaves(tree))


def compile_plan(cfg: RunConfig, devices: list[Any], hbm: float | None) -> tuple[MemoryPlan, Any]:
    """Compile `cfg`'s train step on `devices` and measure it; returns the plan and the
    `CompiledSteps` (whose `memory` the plan's numbers are)."""
    if cfg.init.source:
        raise ValueError(
            "llm-jax plan covers pretraining configs (no init.from_*): a fine-tuning run's "
            "frozen base is read from disk; plan the base architecture as a model section."
        )
    model_config = cfg.model_config(cfg.data.vocab_size or 256)
    mesh = make_mesh(cfg.mesh, devices)
    tc = cfg.train
    layout = state_layout(
        model_config, cfg.optimizer, mesh, total_steps=tc.steps, rules=cfg.mesh.rules
    )
    batch = abstract_batch(cfg)
    platform = devices[0].platform  # attention picks its kernel for the target's platform
    with (
        target_platform(platform),
        recording_used() as used,
        activation_sharding(mesh, layout.rules),
    ):
        steps = compile_steps(
            layout,
            cfg.data.objective,
            batch,
            loss=LossConfig(label_smoothing=tc.label_smoothing, z_loss=tc.z_loss),
            grad_accum_steps=tc.grad_accum_steps,
            skip_nonfinite=tc.on_nonfinite == "skip",
        )
    mem, state = steps.memory, layout.abstract_state
    placed = [
        jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh, len(v.shape)))
        for v in batch.values()
    ]
    table = tuple(
        (
            jax.tree_util.keystr(path, simple=True, separator="/"),
            x.shape,
            str(x.dtype),
            str(tuple(x.sharding.spec)),
            _device_bytes(x),
        )
        for path, x in jax.tree_util.tree_leaves_with_path(state.params)
    )
    plan = MemoryPlan(
        params=_tree_bytes(state.params),
        opt_state=_tree_bytes(state.opt_state),
        batch=_tree_bytes(placed),
        other=_tree_bytes((state.step, state.rng)),
        arguments=mem.argument_size_in_bytes,
        outputs=mem.output_size_in_bytes,
        aliased=mem.alias_size_in_bytes,
        temporaries=mem.temp_size_in_bytes,
        code=mem.generated_code_size_in_bytes,
        hbm=hbm,
        param_table=table,
        mesh=dict(mesh.shape),
        # what the traced calls ran, after any per-call fallback (pallas needs T % 128 == 0)
        attention=", ".join(sorted(used)) or resolve(model_config.attention_impl, platform),
    )
    return plan, steps


def candidates(cfg: RunConfig, num_devices: int) -> list[tuple[str, RunConfig]]:
    """Single changes that lower per-device memory, smallest first: those that keep the
    training math (each stronger remat policy, 2x/4x/8x gradient accumulation), then
    FSDP over all devices (only the layout changes), then half the batch."""
    out: list[tuple[str, RunConfig]] = []
    model = dict(cfg.model)
    current = model.get("remat_policy", "none")
    start = REMAT_ORDER.index(current) + 1 if current in REMAT_ORDER else len(REMAT_ORDER)
    for policy in REMAT_ORDER[start:]:
        changed = cfg.replace(model={**model, "remat_policy": policy})
        out.append((f"model.remat_policy={policy}", changed))
    b, acc = cfg.data.batch_size, cfg.train.grad_accum_steps
    for factor in (2, 4, 8):
        if b % (acc * factor) == 0:
            train = cfg.train.replace(grad_accum_steps=acc * factor)
            out.append((f"train.grad_accum_steps={acc * factor}", cfg.replace(train=train)))
    if cfg.mesh.rules == "dp" and num_devices > 1:
        mesh = MeshConfig(data=1, fsdp=-1, tensor=cfg.mesh.tensor, rules="fsdp")
        out.append(("mesh.rules=fsdp mesh.data=1 mesh.fsdp=-1", cfg.replace(mesh=mesh)))
    if b % 2 == 0:
        data = cfg.data.replace(batch_size=b // 2)
        out.append((f"data.batch_size={b // 2}", cfg.replace(data=data)))
    return out


def suggest(
    cfg: RunConfig, devices: list[Any], hbm: float, *, limit: int = 4
) -> tuple[str, MemoryPlan] | None:
    """The first of `candidates` (at most `limit` recompiles) whose step fits `hbm`."""
    for change, candidate in candidates(cfg, len(devices))[:limit]:
        try:
            plan, _ = compile_plan(candidate, devices, hbm)
        except ValueError:  # e.g. a batch the new mesh cannot split
            continue
        if plan.fits:
            return change, plan
    return None


def _mib(n: float) -> str:
    return f"{n / 2**20:12,.2f} MiB"


def report(plan: MemoryPlan, target: str, suggestion: tuple[str, MemoryPlan] | None) -> str:
    """The printed plan: memory per device, the verdict, a suggestion, the parameter table."""

    def row(label: str, n: float, note: str = "") -> str:
        return f"  {label:<17}{_mib(n)}{note}"

    lines = [
        f"memory plan for {target}: mesh {plan.mesh}, attention {plan.attention}, per device",
        row("parameters", plan.params),
        row("optimizer state", plan.opt_state),
        row("batch", plan.batch),
        row("step + rng", plan.other),
        row("arguments", plan.arguments, "   (compiled; the four above)"),
        row("outputs", plan.outputs, f"   ({_mib(plan.aliased).strip()} aliased to arguments)"),
        row("temporaries", plan.temporaries),
        row("code", plan.code),
        row("total", plan.total),
    ]
    if plan.hbm is None:
        lines.append("  HBM              unknown on this backend (pass --hbm-gib): no verdict")
    else:
        verdict = "fits" if plan.fits else "does not fit"
        lines.append(row("HBM", plan.hbm, f"   -> {verdict}"))
    if plan.fits is False:
        if suggestion is None:
            lines.append(
                "suggestion: none of the single changes tried fits (stronger remat, fsdp, "
                "gradient accumulation, half the batch); combine them or use more devices."
            )
        else:
            change, fixed = suggestion
            lines.append(f"suggestion: {change} (total {_mib(fixed.total).strip()}, fits)")
    lines.append("parameters (path, shape, dtype, sharding, bytes per device):")
    width = max(len(row[0]) for row in plan.param_table)
    for path, shape, dtype, spec, nbytes in plan.param_table:
        lines.append(f"  {path:<{width}}  {shape!s:<20} {dtype:<9} {spec:<28} {nbytes:>12,}")
    return "\n".join(lines)
