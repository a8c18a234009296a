"""Checkpoint layer: round trips, keep-N, interval, resume, integrity fallback, resharding."""

import json
import warnings

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llm_jax.checkpoint import (
    MANIFEST_NAME,
    CheckpointIntegrityWarning,
    CheckpointManager,
    StepRef,
    locate,
    read_params,
    verify_step_dir,
    write_manifest,
)
from llm_jax.checkpoint import manager as manager_module
from llm_jax.checkpoint.trees import tree_mismatch


@flax.struct.dataclass
class TrainState:
    """The shape of the trainer's state: step, params, optax state, typed PRNG key."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


@pytest.fixture(scope="module")
def mesh8():
    return jax.make_mesh((8,), ("data",))


def make_state(seed: int, mesh) -> TrainState:
    """A small state; ``embed`` is sharded over the data axis, the rest replicated."""
    k = jax.random.split(jax.random.key(seed), 3)
    params = {
        "embed": jax.random.normal(k[0], (16, 8)),
        "dense": {"kernel": jax.random.normal(k[1], (8, 4)), "bias": jnp.full((4,), float(seed))},
    }
    specs = {"embed": P("data", None), "dense": {"kernel": P(), "bias": P()}}
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    # One real update so mu/nu/count are not all zeros/ones.
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)
    return TrainState(
        step=jnp.asarray(seed, jnp.int32), params=params, opt_state=opt_state, rng=k[2]
    )


def abstract_of(state, sharding_fn=None):
    """ShapeDtypeStructs of ``state`` with its own shardings or ``sharding_fn(path, leaf)``."""

    def leaf(path, x):
        sharding = x.sharding if sharding_fn is None else sharding_fn(path, x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(leaf, state)


def as_numpy(tree):
    """Host copies of every leaf; typed keys as their raw key data."""

    def leaf(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return jax.tree.map(leaf, tree)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(as_numpy(a)), jax.tree.leaves(as_numpy(b)), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def largest_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_round_trip_state_data_config(tmp_path, mesh8):
    state = make_state(3, mesh8)
    data_state = {"shard": 2, "offset": 12345, "files": ["a.txt", "b.txt"]}
    config = {"model": {"num_layers": 2, "d_model": 8}, "train": {"lr": 1e-3, "warmup": None}}
    with CheckpointManager(tmp_path, save_interval_steps=10) as ckpt:
        assert ckpt.save(10, state, data_state=data_state, config=config)
        data_state["offset"] = -1  # mutating after save must not reach the async write
        restored = ckpt.restore(abstract_of(state))
    assert restored.step == 10
    assert isinstance(restored.state, TrainState)
    assert_same(restored.state, state)
    assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)
    assert restored.data_state == {"shard": 2, "offset": 12345, "files": ["a.txt", "b.txt"]}
    assert restored.config == config
    assert restored.tokenizer_dir is None
    assert verify_step_dir(tmp_path / "10", 10).ok


def test_round_trip_nnx_state_params(tmp_path, mesh8):
    _, params = nnx.split(nnx.Linear(4, 8, rngs=nnx.Rngs(0)))
    state = {"params": params, "opt_state": optax.adamw(1e-3).init(params)}
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state)
        restored = ckpt.restore(abstract_of(state))
    assert isinstance(restored.state["params"], nnx.State)
    assert_same(restored.state, state)


def test_interval_keep_n_and_manifests(tmp_path, mesh8):
    state = make_state(0, mesh8)
    ckpt = CheckpointManager(tmp_path, save_interval_steps=2, max_to_keep=2)
    saved = [step for step in range(1, 8) if ckpt.save(step, state)]
    assert saved == [2, 4, 6]
    assert not ckpt.should_save(6) and not ckpt.should_save(7) and ckpt.should_save(8)
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)  # already saved: nothing to do
    ckpt.close()
    assert ckpt.all_steps() == [6, 7]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]
    for step in (6, 7):
        manifest = json.loads((tmp_path / str(step) / MANIFEST_NAME).read_text())
        assert manifest["step"] == step and manifest["algorithm"] == "sha256"
        assert any(name.startswith("state/") for name in manifest["files"])
        assert verify_step_dir(tmp_path / str(step), step).ok


def test_async_save_finishes_and_rerun_resumes_latest(tmp_path, mesh8):
    ckpt = CheckpointManager(tmp_path, save_interval_steps=5, async_save=True)
    assert ckpt.latest_step() is None
    for step in (5, 10):
        assert ckpt.save(step, make_state(step, mesh8), data_state={"step": step})
    assert ckpt.latest_step() == 10  # in flight or done, it is ours
    ckpt.wait_until_finished()
    assert (tmp_path / "10" / MANIFEST_NAME).is_file()
    ckpt.close()

    rerun = CheckpointManager(tmp_path, save_interval_steps=5)
    assert rerun.latest_step() == 10
    restored = rerun.restore(abstract_of(make_state(0, mesh8)))
    assert restored.step == 10 and restored.data_state == {"step": 10}
    assert_same(restored.state, make_state(10, mesh8))
    older = rerun.restore(abstract_of(make_state(0, mesh8)), step=5)
    assert_same(older.state, make_state(5, mesh8))
    with pytest.warns(UserWarning, match="already holds the later good checkpoint step 10"):
        assert not rerun.save(6, older.state, force=True)
    assert not rerun.save(5, older.state, force=True)  # already there: quietly nothing to do
    rerun.close()


def test_manifest_is_committed_with_the_step(tmp_path, mesh8, monkeypatch):
    """The manifest goes into orbax's temporary directory, before the atomic rename."""
    written = []
    real = manager_module.write_manifest
    monkeypatch.setattr(
        manager_module, "write_manifest", lambda d, step: written.append(str(d)) or real(d, step)
    )
    with CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(1, make_state(1, mesh8))
        ckpt.save(2, make_state(2, mesh8))
    assert written == [str(tmp_path / f"{s}.orbax-checkpoint-tmp") for s in (1, 2)]
    assert all(verify_step_dir(tmp_path / str(s), s).ok for s in (1, 2))


def test_tokenizer_dir_copied_and_found(tmp_path, mesh8):
    tok = tmp_path / "tok"
    (tok / "sub").mkdir(parents=True)
    (tok / "spm.model").write_bytes(bytes(range(256)) * 4)
    (tok / "sub" / "vocab.json").write_text('{"a": 0}')
    work = tmp_path / "work"
    with CheckpointManager(work, save_interval_steps=1) as ckpt:
        ckpt.save(1, make_state(1, mesh8), tokenizer_dir=tok)
        ckpt.save(2, make_state(2, mesh8))
        ckpt.wait_until_finished()
        found = ckpt.tokenizer_dir(1)
        assert found is not None
        assert (found / "spm.model").read_bytes() == (tok / "spm.model").read_bytes()
        assert (found / "sub" / "vocab.json").read_text() == '{"a": 0}'
        assert ckpt.tokenizer_dir(2) is None
        assert ckpt.restore(abstract_of(make_state(0, mesh8)), step=1).tokenizer_dir == found
    manifest = json.loads((work / "1" / MANIFEST_NAME).read_text())
    assert "tokenizer/spm.model" in manifest["files"]


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "flip": (_flip, "sha256"),
    "truncate": (lambda p: p.write_bytes(p.read_bytes()[:-7]), "bytes"),
    "delete": (lambda p: p.unlink(), "missing"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupted_latest_step_falls_back(tmp_path, mesh8, kind):
    with CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(1, make_state(1, mesh8), data_state={"step": 1})
        ckpt.save(2, make_state(2, mesh8), data_state={"step": 2})
    corrupt, words = CORRUPTIONS[kind]
    bad_file = largest_file(tmp_path / "2")
    corrupt(bad_file)

    ckpt = CheckpointManager(tmp_path, save_interval_steps=1)
    with pytest.warns(CheckpointIntegrityWarning, match=r"step 2 .*falling back to step 1") as rec:
        restored = ckpt.restore(abstract_of(make_state(0, mesh8)))
    message = str(rec[0].message)
    assert words in message and bad_file.name in message
    assert restored.step == 1 and restored.data_state == {"step": 1}
    assert_same(restored.state, make_state(1, mesh8))
    assert ckpt.latest_step() == 1
    assert ckpt.should_save(2)  # the bad step no longer blocks its own step number
    ckpt.close()


def test_unverified_step_skipped_then_quarantined_on_save(tmp_path, mesh8):
    with CheckpointManager(tmp_path, save_interval_steps=1) as ckpt:
        ckpt.save(1, make_state(1, mesh8))
        ckpt.save(2, make_state(2, mesh8))
    (tmp_path / "2" / MANIFEST_NAME).unlink()  # finalized by orbax, but nothing vouches for it

    ckpt = CheckpointManager(tmp_path, save_interval_steps=1)
    with pytest.warns(CheckpointIntegrityWarning, match=r"step 2 .*no checksum manifest"):
        assert ckpt.latest_step() == 1
    with pytest.warns(CheckpointIntegrityWarning, match=r"moved corrupted checkpoint step 2"):
        assert ckpt.save(2, make_state(22, mesh8))
    ckpt.close()
    assert (tmp_path / "corrupted" / "2").is_dir()
    assert ckpt.all_steps() == [1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointIntegrityWarning)
        rerun = CheckpointManager(tmp_path)
        assert_same(rerun.restore(abstract_of(make_state(0, mesh8))).state, make_state(22, mesh8))
        rerun.close()

    (tmp_path / "2" / MANIFEST_NAME).unlink()
    trusting = CheckpointManager(tmp_path, allow_unverified=True)
    with pytest.warns(CheckpointIntegrityWarning, match="unverified because allow_unverified"):
        assert trusting.restore(abstract_of(make_state(0, mesh8))).step == 2
    trusting.close()


def test_all_steps_corrupted_or_none_gives_clear_errors(tmp_path, mesh8):
    abstract = abstract_of(make_state(0, mesh8))
    empty = CheckpointManager(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        empty.restore(abstract)
    empty.close()

    with CheckpointManager(tmp_path / "w", save_interval_steps=1) as ckpt:
        ckpt.save(1, make_state(1, mesh8))
        ckpt.save(2, make_state(2, mesh8))
    for step in (1, 2):
        _flip(largest_file(tmp_path / "w" / str(step)))
    ckpt = CheckpointManager(tmp_path / "w")
    with pytest.warns(CheckpointIntegrityWarning, match="no good step left"):
        with pytest.raises(ValueError, match=r"passes verification: step 2 .*; step 1 "):
            ckpt.restore(abstract)
    with pytest.raises(ValueError, match=r"checkpoint step 1 .* sha256"):
        ckpt.restore(abstract, step=1)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 7 .*steps \[1, 2\]"):
        ckpt.restore(abstract, step=7)
    assert ckpt.latest_step() is None
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path, mesh8):
    state = make_state(5, mesh8)
    assert state.params["embed"].sharding.spec == P("data", None)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(0, state, force=True)

    mesh24 = jax.make_mesh((2, 4), ("x", "y"))
    specs = {"embed": P(None, "y"), "kernel": P("x", "y")}

    def sharding_fn(path, leaf):
        name = jax.tree_util.keystr(path[-1:]).strip("[]'")
        if leaf.ndim == 2 and name in specs:
            return NamedSharding(mesh24, specs[name])
        return NamedSharding(mesh24, P())

    target = abstract_of(state, sharding_fn)
    with CheckpointManager(tmp_path) as ckpt:
        restored = ckpt.restore(target).state
    assert_same(restored, state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
        assert got.sharding == want.sharding
    assert restored.params["embed"].sharding.spec == P(None, "y")
    assert restored.opt_state[0].mu["dense"]["kernel"].sharding.spec == P("x", "y")
    assert restored.params["embed"].addressable_shards[0].data.shape == (16, 2)


def test_mismatched_restore_target_names_the_leaf(tmp_path, mesh8):
    state = make_state(1, mesh8)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(0, state, force=True)
    ckpt = CheckpointManager(tmp_path)
    wider = make_state(1, mesh8).replace(
        params={**state.params, "embed": jnp.zeros((16, 12), jnp.float32)}
    )
    with pytest.raises(
        ValueError,
        match=r"'params\.embed' is \(16, 8\) float32 in the checkpoint but \(16, 12\) "
        r"float32 in the restore target.*different",
    ):
        ckpt.restore(abstract_of(wider))
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, state)
    with pytest.raises(ValueError, match=r"bfloat16.*use a new workdir or the same config"):
        ckpt.restore(abstract_of(half))
    extra = state.replace(params={**state.params, "lm_head": jnp.zeros((8, 16))})
    with pytest.raises(
        ValueError, match=r"target has leaves the checkpoint lacks: 'params\.lm_head"
    ):
        ckpt.restore(abstract_of(extra))
    with pytest.raises(ValueError, match=r"leaf 'params\.embed' is a int"):
        ckpt.restore(state.replace(params={**state.params, "embed": 3}))
    ckpt.close()


def test_bad_save_inputs_fail_before_writing(tmp_path, mesh8):
    state = make_state(0, mesh8)
    with CheckpointManager(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="config is not JSON-serialisable"):
            ckpt.save(0, state, config={"dtype": jnp.float32}, force=True)
        with pytest.raises(TypeError, match="data_state must be a JSON-able dict"):
            ckpt.save(0, state, data_state=b"{}", force=True)
        with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
            ckpt.save(0, state, tokenizer_dir=tmp_path / "nope", force=True)
        with pytest.raises(ValueError, match="step must be an integer >= 0"):
            ckpt.save(-1, state, force=True)
        assert ckpt.all_steps() == []
    with pytest.raises(ValueError, match="save_interval_steps must be >= 1"):
        CheckpointManager(tmp_path, save_interval_steps=0)


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda d: _flip(d / "a.bin"), "a.bin has a different sha256"),
        (lambda d: (d / "a.bin").write_bytes(b"short"), "a.bin has 5 bytes"),
        (lambda d: (d / "sub" / "b.bin").unlink(), "sub/b.bin is missing"),
        (lambda d: (d / "sub" / "new.bin").write_bytes(b"x"), "sub/new.bin is not in the manifest"),
        (lambda d: (d / MANIFEST_NAME).write_text("{"), "unreadable checksum manifest"),
        (lambda d: (d / MANIFEST_NAME).unlink(), "no checksum manifest"),
        (lambda d: (d / "_CHECKPOINT_METADATA").write_text("{"), "not valid JSON"),
    ],
)
def test_manifest_detects_each_kind_of_damage(tmp_path, damage, words):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(np.arange(1000, dtype=np.int32).tobytes())
    (tmp_path / "sub" / "b.bin").write_bytes(b"hello")
    (tmp_path / "_CHECKPOINT_METADATA").write_text("{}")
    write_manifest(tmp_path, 9)
    assert verify_step_dir(tmp_path, 9).ok
    assert "manifest of step 9" in verify_step_dir(tmp_path, 8).reason  # renamed step
    # orbax rewrites its commit files after the manifest: that is not damage.
    (tmp_path / "commit_success.txt").write_text("ok")
    (tmp_path / "_CHECKPOINT_METADATA").write_text('{"commit_timestamp_nsecs": 1}')
    assert verify_step_dir(tmp_path, 9).ok
    damage(tmp_path)
    check = verify_step_dir(tmp_path, 9)
    assert not check.ok and words in check.reason
    # Every reason reads as a predicate after "it" in the warnings ("it fails its ...").
    assert check.reason.split()[0] in ("has", "fails"), check.reason


def test_locate_picks_the_newest_good_step_and_leaves_the_workdir_alone(tmp_path, mesh8):
    """`locate` accepts a run dir, its checkpoints/ folder or a step folder, falls back past a
    corrupted step with a warning, and never opens an orbax manager: a running job's
    in-flight (temporary) step folder survives."""
    root = tmp_path / "run" / "checkpoints"
    with CheckpointManager(root, save_interval_steps=1, async_save=False) as ckpt:
        ckpt.save(1, make_state(1, mesh8), config={"model": {"x": 1}})
        ckpt.save(2, make_state(2, mesh8))
    in_flight = root / "3.orbax-checkpoint-tmp"
    in_flight.mkdir()
    assert locate(tmp_path / "run") == StepRef(root, 2)
    assert locate(root, step=1).dir == root / "1"
    assert locate(root / "1").config() == {"model": {"x": 1}}
    assert locate(root / "1").tokenizer_dir() is None
    _flip(largest_file(root / "2"))
    with pytest.warns(CheckpointIntegrityWarning, match=r"step 2 .*falling back to step 1"):
        assert locate(root).step == 1
    with pytest.raises(ValueError, match=r"checkpoint step 2 .* sha256"):
        locate(root / "2")
    with pytest.raises(ValueError, match=r"no checkpoint step 5 .* steps \[1, 2\]"):
        locate(root, step=5)
    assert in_flight.is_dir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        locate(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no verified checkpoint step"):
        locate(tmp_path)


def test_read_params_reads_only_the_parameters(tmp_path, mesh8):
    state = make_state(1, mesh8)
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(0, state, force=True)
    want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    params = read_params(tmp_path / "0", want)
    assert_same(params, state.params)
    wrong = {**want, "embed": jax.ShapeDtypeStruct((16, 12), jnp.float32)}
    with pytest.raises(ValueError, match=r"'embed' is \(16, 8\) in the checkpoint but \(16, 12\)"):
        read_params(tmp_path / "0", wrong)


def test_tree_mismatch_lists_missing_extra_and_wrong_shapes():
    have = {"a": np.zeros((2, 3)), "b": np.zeros(4), "extra": np.zeros(1)}
    want = {"a": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": np.zeros(5), "c": np.zeros(1)}
    assert tree_mismatch(have, have) == []
    assert tree_mismatch(have, want) == [
        "the model has leaves the checkpoint lacks: 'c'",
        "the checkpoint has leaves the model lacks: 'extra'",
        "leaf 'b' is (4,) in the checkpoint but (5,) in the model",
    ]
    assert tree_mismatch(have, {**have, "a": np.zeros((2, 3), np.int32)}) == []
    assert tree_mismatch(have, {**have, "a": np.zeros((2, 3), np.int32)}, dtypes=True) == [
        "leaf 'a' is (2, 3) float64 in the checkpoint but (2, 3) int32 in the model"
    ]
    many = {f"k{i}": np.zeros(1) for i in range(5)}
    assert tree_mismatch({}, many, limit=2) == [
        "the model has leaves the checkpoint lacks: 'k0', 'k1' and 3 more"
    ]
