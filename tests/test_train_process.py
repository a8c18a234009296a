"""`llm-jax train` as a real process: exact resume after SIGKILL, a clean stop on SIGTERM,
corrupted-checkpoint fallback, non-finite losses, two hosts == one host, and every config
in `configs/` loading and initialising abstractly.

Each run is a subprocess (`python -m llm_jax.cli train ...`) with a timeout, on a tiny GPT
trained on a 2 KB slice of Tiny Shakespeare with a character tokenizer; every run in this
file uses 4 CPU devices, so the runs that are compared execute the same program.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import portpicker
import pytest
import yaml
from flax import nnx

from llm_jax.checkpoint.manifest import MANIFEST_NAME, verify_step_dir
from llm_jax.models import build
from llm_jax.parallel import MeshConfig, make_mesh
from llm_jax.train.compile import check_batch_size, state_layout
from llm_jax.train.config import config_from_dict, load_config
from llm_jax.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds for one run; a tiny run takes ~5 s on an idle core
DEVICES = 4
STEPS, EVERY = 12, 4  # the reference run: checkpoints at 4, 8 and 12

CONFIG = {
    "name": "process_test",
    "model": {
        "preset": "gpt2-tiny",
        "d_model": 32,
        "num_layers": 1,
        "num_heads": 2,
        "d_ff": 64,
        "max_position_embeddings": 32,
    },
    "data": {
        "tokenizer_type": "char",
        "vocab_size": None,
        "doc_split": "line",
        "seq_len": 32,
        "batch_size": 8,
        "use_cache": False,
    },
    "train": {
        "steps": STEPS,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint_every": EVERY,
        "keep_checkpoints": 3,
        "progress": False,
    },
    # Cosine decay over `steps`: a resumed run must restore the schedule's step too.
    "optimizer": {"learning_rate": 1.0e-2, "warmup_steps": 2, "schedule": "cosine"},
}

# Runs the CLI with one pause point patched in, so that a test can SIGKILL the process at
# an exact place instead of racing it: `before_step N` pauses before the N-th train step,
# `in_prepare 0` pauses in the start-up's data preparation (where the tokenizer is trained),
# `in_manifest N` pauses while checkpoint step N is written but not yet committed (its
# files sit in orbax's temporary directory). The marker file says the pause is reached.
_PAUSE_HOOK = r"""
import pathlib, sys, time

where, n, marker = sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3])
del sys.argv[1:4]


def pause():
    marker.write_text("paused")
    time.sleep(600)


if where == "before_step":
    import dataclasses

    from llm_jax.train import loop

    compile_steps, calls = loop.compile_steps, [0]

    def paused_compile(*args, **kwargs):
        steps = compile_steps(*args, **kwargs)

        def paused_step(state, batch):
            calls[0] += 1
            if calls[0] == n:
                pause()
            return steps.train(state, batch)

        return dataclasses.replace(steps, train=paused_step)

    loop.compile_steps = paused_compile
elif where == "in_prepare":
    from llm_jax.train import data

    data.prepare = lambda *args, **kwargs: pause()
else:
    from llm_jax.checkpoint import manager

    write = manager.write_manifest

    def paused_write(directory, step):
        if step == n:
            pause()
        return write(directory, step)

    manager.write_manifest = paused_write

from llm_jax.cli import main

sys.exit(main(sys.argv[1:]))
"""


# Helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def config_path(tmp_path_factory, corpora) -> Path:
    root = tmp_path_factory.mktemp("process")
    corpus = root / "corpus.txt"
    text = (corpora / "shakespeare.txt").read_text(encoding="utf-8")
    # ~9 batches per epoch: the 12-step runs cross an epoch boundary after the resume point.
    corpus.write_text(text[:2000], encoding="utf-8")
    cfg = {**CONFIG, "data": {**CONFIG["data"], "paths": [str(corpus)]}}
    path = root / "process_test.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


# The module's single-process runs all compile the same programs (one config, 4 devices):
# the first run writes them to a persistent XLA cache and the others load them, ~4 s of
# CPU less per process. A loaded program is the compiled one, byte for byte, so the
# bitwise comparisons below compare exactly what they did without it.
_XLA_CACHE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _xla_cache(tmp_path_factory):
    _XLA_CACHE.append(tmp_path_factory.mktemp("xla_cache"))
    yield
    _XLA_CACHE.clear()


def _env(devices: int = DEVICES, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    if devices == DEVICES and _XLA_CACHE:  # not the two-process runs: their own programs
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(_XLA_CACHE[0]),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        )
    return env


def _train_args(config: Path, workdir: Path, *overrides: str) -> list[str]:
    return ["train", str(config), f"workdir={workdir}", *overrides]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "llm_jax.cli", *args]


def _run(config: Path, workdir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cli(*_train_args(config, workdir, *overrides)),
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stderr[-4000:]}"
    return proc


class _Background:
    """A child process with its output in files, always killed and reaped on exit."""

    def __init__(self, cmd: list[str], log: Path, env: dict[str, str]):
        self.log = log
        self._out = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, condition, what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"process exited ({self.proc.returncode}) before {what}:\n"
                    f"{self.output()[-4000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-4000:]}")
            time.sleep(0.02)

    def __enter__(self) -> "_Background":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        self._out.close()


def _losses(workdir: Path) -> dict[int, float]:
    """step -> train loss from metrics.jsonl (None for a non-finite loss); each step once,
    in order (a resumed run drops the records the interrupted one wrote after its
    checkpoint)."""
    records = [r for r in read_metrics(workdir / "metrics.jsonl") if "train/loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps out of order or repeated: {steps}"
    return {r["step"]: r["train/loss"] for r in records}


def _steps(workdir: Path) -> list[int]:
    """The committed checkpoint steps (orbax's temporary directories are not steps)."""
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def _assert_verifies(workdir: Path, step: int) -> None:
    check = verify_step_dir(workdir / "checkpoints" / str(step), step)
    assert check.ok, f"checkpoint step {step}: {check.reason}"


def _params(workdir: Path, step: int) -> list[np.ndarray]:
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


@pytest.fixture(scope="module")
def reference(config_path, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps, checkpointing every EVERY."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    _ok(_run(config_path, workdir))
    assert sorted(_losses(workdir)) == list(range(1, STEPS + 1))
    assert _steps(workdir) == [4, 8, 12]
    return workdir


# 1. Exact resume after SIGKILL -----------------------------------------------------------

KILLS = {
    # Killed two steps after checkpoint 4 (metrics for steps 5 and 6 already written).
    "after_checkpoint": ("before_step", EVERY + 3, EVERY),
    # Killed while checkpoint 8 is written into orbax's temporary directory.
    "during_save": ("in_manifest", 2 * EVERY, EVERY),
}


@pytest.mark.parametrize("async_checkpoint", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kill", sorted(KILLS))
def test_sigkill_then_resume_is_exact(config_path, reference, tmp_path, kill, async_checkpoint):
    where, n, resume_step = KILLS[kill]
    workdir, marker = tmp_path / "run", tmp_path / "paused"
    flag = f"train.async_checkpoint={str(async_checkpoint).lower()}"
    cmd = [
        sys.executable,
        "-c",
        _PAUSE_HOOK,
        where,
        str(n),
        str(marker),
        *_train_args(config_path, workdir, flag),
    ]
    with _Background(cmd, tmp_path / "killed.log", _env()) as child:
        manifest = workdir / "checkpoints" / str(resume_step) / MANIFEST_NAME
        child.wait_for(
            lambda: marker.exists() and manifest.exists(),
            f"the pause point and checkpoint step {resume_step}",
        )
        child.proc.kill()
        assert child.proc.wait(timeout=60) == -signal.SIGKILL
    assert _steps(workdir) == [resume_step]
    if kill == "during_save":
        assert any(
            p.name.endswith(".orbax-checkpoint-tmp") for p in (workdir / "checkpoints").iterdir()
        )

    proc = _ok(_run(config_path, workdir, flag))
    assert f"resuming from step {resume_step}" in proc.stderr
    resumed, expected = _losses(workdir), _losses(reference)
    # Same program on the same CPU: bitwise-equal losses, not merely close ones.
    assert resumed == expected
    assert _steps(workdir) == [4, 8, 12]
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp"))
    for step in _steps(workdir):
        _assert_verifies(workdir, step)
    for a, b in zip(_params(workdir, STEPS), _params(reference, STEPS), strict=True):
        np.testing.assert_array_equal(a, b)


# 2. SIGTERM saves and exits cleanly ---------------------------------------------------------


def test_sigterm_saves_the_current_step_and_resumes(config_path, tmp_path):
    workdir = tmp_path / "run"
    long_run = _train_args(
        config_path, workdir, "train.steps=100000", "train.checkpoint_every=100000"
    )
    with _Background(_cli(*long_run), tmp_path / "term.log", _env()) as child:
        metrics = workdir / "metrics.jsonl"
        child.wait_for(
            lambda: metrics.exists() and metrics.read_text().count("\n") >= 1,
            "the first metrics record",
        )
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(timeout=TIMEOUT) == 128 + signal.SIGTERM, child.output()[-4000:]
        output = child.output()
    reached = max(_losses(workdir))
    assert f"received signal {int(signal.SIGTERM)}: saved step {reached}, exiting" in output
    assert _steps(workdir) == [reached], output[-2000:]
    _assert_verifies(workdir, reached)

    proc = _ok(_run(config_path, workdir, f"train.steps={reached + 2}"))
    assert f"resuming from step {reached}" in proc.stderr
    assert sorted(_losses(workdir)) == list(range(1, reached + 3))
    assert _steps(workdir)[-1] == reached + 2


def test_ctrl_c_during_start_up_prints_one_line_and_exits_130(config_path, tmp_path):
    workdir, marker = tmp_path / "run", tmp_path / "paused"
    cmd = [sys.executable, "-c", _PAUSE_HOOK, "in_prepare", "0", str(marker)]
    cmd += _train_args(config_path, workdir)
    with _Background(cmd, tmp_path / "int.log", _env()) as child:
        child.wait_for(marker.exists, "the start-up's data preparation")
        child.proc.send_signal(signal.SIGINT)
        assert child.proc.wait(timeout=TIMEOUT) == 130, child.output()[-4000:]
        output = child.output()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines == [
        "llm-jax train: interrupted by signal 2 during start-up; nothing was saved, rerun to "
        "start again."
    ]
    assert _steps(workdir) == []


def test_rerun_of_a_finished_run_says_so(config_path, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    proc = _ok(_run(config_path, workdir))
    assert f"is already at step {STEPS}, train.steps={STEPS}: nothing to train" in proc.stderr
    assert _losses(workdir) == _losses(reference)


def test_every_checkpoint_corrupted_says_it_starts_again(config_path, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in _steps(workdir):
        (workdir / "checkpoints" / str(step) / MANIFEST_NAME).write_text("{")
    proc = _ok(_run(config_path, workdir, "train.steps=2", "train.checkpoint_every=1"))
    assert "passes verification (steps [4, 8, 12]" in proc.stderr
    assert "starting again from step 0" in proc.stderr


# 3. A corrupted checkpoint falls back to the previous good one ------------------------------


def test_corrupted_checkpoint_falls_back(config_path, reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    shutil.rmtree(workdir / "checkpoints" / "12")  # a run that stopped at step 8
    victim = max(
        (p for p in (workdir / "checkpoints" / "8" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    proc = _ok(_run(config_path, workdir))
    assert re.search(r"checkpoint step 8 .* corrupted", proc.stderr), proc.stderr[-4000:]
    assert "falling back to step 4" in proc.stderr
    assert "resuming from step 4" in proc.stderr
    assert (workdir / "checkpoints" / "corrupted" / "8").is_dir()
    assert _losses(workdir) == _losses(reference)
    assert _steps(workdir) == [4, 8, 12]
    for step in _steps(workdir):
        _assert_verifies(workdir, step)


# 4. Non-finite losses -----------------------------------------------------------------------

# Warmup makes step 1's learning rate 0 and step 2's 5e29: step 2's update overflows the
# activations, so step 3's loss is NaN.
EXPLODE = ("optimizer.learning_rate=1.0e+30", "optimizer.warmup_steps=2")


def test_nonfinite_stop_keeps_the_last_good_checkpoint(config_path, tmp_path):
    workdir = tmp_path / "run"
    proc = _run(
        config_path,
        workdir,
        *EXPLODE,
        "train.on_nonfinite=stop",
        "train.steps=10",
        "train.checkpoint_every=1",
    )
    assert proc.returncode != 0
    assert "NonFiniteLossError" in proc.stderr
    assert "optimizer.learning_rate" in proc.stderr
    assert "train.on_nonfinite=skip" in proc.stderr
    assert "the last good checkpoint (step" in proc.stderr
    bad = int(re.search(r"non-finite loss .* at step (\d+)", proc.stderr).group(1))
    assert 1 < bad < 10
    assert _steps(workdir)[-1] == bad - 1  # nothing of the bad step was saved
    assert max(_losses(workdir)) == bad - 1
    _assert_verifies(workdir, bad - 1)
    assert all(np.isfinite(p).all() for p in _params(workdir, bad - 1))


def test_nonfinite_stop_without_a_checkpoint_says_none_was_saved(config_path, tmp_path):
    proc = _run(config_path, tmp_path / "run", *EXPLODE, "train.on_nonfinite=stop")
    assert proc.returncode == 1
    assert f"no checkpoint was saved yet (train.checkpoint_every={EVERY})" in proc.stderr
    assert "last good checkpoint" not in proc.stderr


def test_nonfinite_skip_keeps_parameters(config_path, tmp_path):
    workdir = tmp_path / "run"
    _ok(
        _run(
            config_path,
            workdir,
            *EXPLODE,
            "train.on_nonfinite=skip",
            "train.steps=6",
            "train.checkpoint_every=3",
        )
    )
    finite = {r["step"]: r["train/finite"] for r in read_metrics(workdir / "metrics.jsonl")}
    assert finite == {1: 1, 2: 1, 3: 0, 4: 0, 5: 0, 6: 0}
    at_3, at_6 = _params(workdir, 3), _params(workdir, 6)
    assert all(np.isfinite(p).all() for p in at_6)
    # Steps 4-6 were all skipped: the parameters are those after step 2, bit for bit.
    for a, b in zip(at_3, at_6, strict=True):
        np.testing.assert_array_equal(a, b)


# 5. Two processes == one process ------------------------------------------------------------


def test_two_processes_match_one(config_path, reference, tmp_path):
    """jax.distributed on localhost: 2 processes x 2 CPU devices (gloo collectives, jax's
    CPU default) against the 1 process x 4 devices reference, in one shared workdir."""
    workdir = tmp_path / "run"
    coordinator = f"localhost:{portpicker.pick_unused_port()}"
    cmd = _cli(*_train_args(config_path, workdir))
    with (
        _Background(
            cmd,
            tmp_path / "p0.log",
            _env(2, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="0"),
        ) as p0,
        _Background(
            cmd,
            tmp_path / "p1.log",
            _env(2, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"),
        ) as p1,
    ):
        for p in (p0, p1):
            assert p.proc.wait(timeout=TIMEOUT) == 0, p.output()[-4000:]
        assert "data=4" in p0.output()  # one mesh over both processes' devices
    two, one = _losses(workdir), _losses(reference)
    assert sorted(two) == list(range(1, STEPS + 1))  # process 0 alone wrote each step once
    np.testing.assert_allclose(
        [two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=0, atol=1e-5
    )
    assert _steps(workdir) == [4, 8, 12]
    for step in _steps(workdir):
        _assert_verifies(workdir, step)


# 6. Every config loads and initialises; bad configs fail at load ----------------------------

# ELMo's configs (model.family: elmo) have their own trainer; tests/test_elmo.py loads them.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if not p.stem.startswith("elmo_"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_loads_and_initialises(path, corpora, monkeypatch):
    monkeypatch.chdir(REPO)  # data.paths are relative to the repository root, where runs start
    overrides = ["workdir=/nonexistent"]
    paths = yaml.safe_load(path.read_text())["data"].get("paths", [])
    missing = [corpus for corpus in paths if not (REPO / corpus).exists()]
    if missing:  # a bare clone, without ../shared/data beside it (CI always has it)
        assert not os.environ.get("CI"), f"{path.name}: data.paths entry {missing[0]} is missing"
        with pytest.raises(ValueError, match=rf"data.paths: {missing[0]} not found.*data.paths="):
            load_config(path, overrides)
        overrides.append(f"data.paths=[{corpora / 'shakespeare.txt'}]")
    data = yaml.safe_load(path.read_text())["data"]
    for key in ("validation_paths", "test_paths"):  # held-out files of ../shared/data
        if any(not (REPO / p).exists() for p in data.get(key, [])):
            overrides.append(f"data.{key}=[{corpora / 'shakespeare.txt'}]")
    cfg = load_config(path, overrides)
    model_config, partition = _model_of(cfg, corpora)
    if model_config.position == "learned":
        assert cfg.data.seq_len + model_config.prompt_length <= model_config.max_position_embeddings
    model = nnx.eval_shape(lambda: build(model_config, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) > 0
    # The abstract train state with its shardings (optimizer included), on one device.
    mesh = make_mesh(MeshConfig(rules=cfg.mesh.rules), jax.devices()[:1])
    layout = state_layout(
        model_config,
        cfg.optimizer,
        mesh,
        total_steps=cfg.train.steps,
        rules=cfg.mesh.rules,
        partition=partition,
    )
    check_batch_size(cfg.data.batch_size, mesh, cfg.train.grad_accum_steps)
    assert jax.tree.leaves(layout.abstract_state.opt_state)
    assert math.prod(cfg.mesh.shape(8)) == 8  # the mesh fits the 8 test devices


# The pretraining config whose run each fine-tuning config starts from (its init folder).
FINETUNE_BASES = {
    "finetune_sentiment": "bert_tiny",
    "finetune_translation": "t5_tiny",
    "finetune_instruct_lora": "tiny",
}


def _model_of(cfg, corpora):
    """(model config, partition) of a config; a fine-tuning config's model is its base's
    (from the pretraining config it names) with its changes, heads and adapters."""
    if not cfg.init.source:
        return cfg.model_config(cfg.data.vocab_size or 256), None
    from llm_jax.finetune.base import finetune_model_config
    from llm_jax.finetune.partition import partition_for
    from llm_jax.finetune.setup import _with_task_head

    base = load_config(
        REPO / "configs" / f"{FINETUNE_BASES[cfg.name]}.yaml",
        ["workdir=/x", f"data.paths=[{corpora / 'shakespeare.txt'}]"],  # only its model is read
    )
    # The folder the config's comment says to make: the base run, or its HF export.
    assert cfg.init.source in (f"runs/{base.name}", f"runs/{base.name}_hf")
    base_cfg = base.model_config(base.data.vocab_size or 256)
    model_config = finetune_model_config(base_cfg, cfg.model, cfg.finetune)
    if cfg.data.objective == "classification":
        model_config = _with_task_head(model_config, 2)
    shapes = nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: build(model_config, rngs=nnx.Rngs(0))), nnx.Param)
    )
    new = ["classifier/kernel", "classifier/bias"] if model_config.num_labels else []
    return model_config, partition_for(model_config, cfg.finetune, shapes, new)


BAD_OVERRIDES = [
    (["train.stepz=3"], r"unknown TrainConfig keys \['stepz'\] in section 'train'.*'steps'"),
    (["trian.steps=3"], r"unknown section 'trian'.*'train'"),
    (["train.steps"], r"must look like section.key=value"),
    (["train.steps=0"], r"train.steps=0 must be an integer >= 1"),
    (["train.steps=10.5"], r"train.steps=10.5 must be a whole number"),
    (["train.checkpoint_every=often"], r"train.checkpoint_every='often' must be a number"),
    (["train.on_nonfinite=halt"], r"'halt' is not one of \['stop', 'skip'\]"),
    (["optimizer.name=adam"], r"'adam' is not one of \['adamw'"),
    (["optimizer.schedule=cos"], r"'cos' is not one of \['cosine'"),
    (["mesh.rules=zero3"], r"'zero3' is not one of \['dp', 'fsdp', 'fsdp_tp'\]"),
    (["mesh.data=0"], r"must be positive"),
    (["data.tokenizer_type=wordpiece"], r"'wordpiece' is not one of \['unigram'"),
    (["data.batch_size=2.5"], r"data.batch_size=2.5 must be a whole number"),
    (["model.d_modle=64"], r"unknown ModelConfig keys \['d_modle'\].*'d_model'"),
    (["model.preset=gpt5"], r"unknown preset 'gpt5'.*'gpt2-tiny'"),
    (["model.num_heads=3"], r"num_heads=3 does not divide d_model=128"),
    (["distributed.port=1"], r"unknown DistributedConfig keys \['port'\].*'coordinator_address'"),
]


@pytest.mark.parametrize(
    ("overrides", "message"), BAD_OVERRIDES, ids=[o[0].split("=")[0] for o, _ in BAD_OVERRIDES]
)
def test_bad_config_fails_at_load_naming_the_choices(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", overrides)


def test_whole_float_for_an_int_field_becomes_an_int():
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.steps=1e3"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)


def test_bad_yaml_key_fails_at_load(tmp_path):
    d = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    d["trainer"] = {"steps": 3}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(
        ValueError, match=r"unknown RunConfig keys \['trainer'\] at the top level.*'train'"
    ):
        load_config(path)
    with pytest.raises(ValueError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_a_bad_override_without_a_traceback(tmp_path):
    proc = subprocess.run(
        _cli("train", str(REPO / "configs" / "tiny.yaml"), f"workdir={tmp_path}", "train.stepz=3"),
        cwd=REPO,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2
    assert "error: unknown TrainConfig keys ['stepz'] in section 'train'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_resolved_config_round_trips(config_path, reference):
    """The config.json a run writes (model filled in from the tokenizer) loads back."""
    saved = json.loads((reference / "config.json").read_text())
    cfg = config_from_dict(saved, source=str(reference / "config.json"))
    original = load_config(config_path, [f"workdir={reference}"])
    for section in ("data", "train", "optimizer", "mesh", "distributed"):
        assert getattr(cfg, section) == getattr(original, section), section
    model = cfg.model_config()
    assert model.vocab_size == saved["model"]["vocab_size"] > 0
    assert model.to_dict() == saved["model"]
