"""Orbax checkpoint manager with checksums, corruption fallback and resharding restore.

One checkpoint step is one directory ``<workdir>/<step>/`` written atomically by orbax:

    state/        the train state pytree (orbax StandardSave: OCDBT/zarr array files)
    data/         the data iterator state (JsonSave), when given
    config/       the resolved config (JsonSave), when given
    tokenizer/    a copy of the tokenizer directory, when given
    llm_jax_manifest.json   size + sha256 of every file above (see ``manifest.py``)

Saves are asynchronous: ``save`` returns once the arrays are copied to host memory and the
files are written on a background thread. The manifest is written by orbax's
post-finalization callback into the still-temporary step directory, so the atomic rename
that commits the step commits its manifest too; if that ever fails, the manifest is
written after the save completes (``wait_until_finished``, the next ``save``, ``close``).

What counts as corrupted: a step whose files differ from its manifest (a file missing,
truncated, extended or with changed bytes, or an unlisted file), whose manifest is
unreadable, or which has no manifest. Orbax considers a manifest-less step finalized, but
nothing vouches for its bytes (another tool wrote it, or a run died between commit and a
late manifest), so by default it is *unverified* and skipped like a corrupted one;
``allow_unverified=True`` restores such steps with a warning. ``restore()`` and
``latest_step()`` skip bad steps with a ``CheckpointIntegrityWarning`` naming the step and
the reason; the next ``save`` that would collide with them moves them to
``<workdir>/corrupted/`` (kept for inspection, never deleted), so training continues from
the good step.

Typed PRNG keys (``jax.random.key``) in the state are saved by orbax as their raw
``key_data`` and restored as typed keys when the restore target leaf has a key dtype.

Loading never executes code: arrays are tensorstore files, everything else is JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import operator
import os
import threading
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from llm_jax.checkpoint.manifest import MANIFEST_NAME, Verification, verify_step_dir, write_manifest
from llm_jax.checkpoint.trees import leaf_name, tree_mismatch

__all__ = ["CheckpointIntegrityWarning", "CheckpointManager", "Restored", "read_params"]

_STATE, _DATA, _CONFIG, _TOKENIZER = "state", "data", "config", "tokenizer"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's temporary step directory suffix
QUARANTINE_DIR = "corrupted"


class CheckpointIntegrityWarning(UserWarning):
    """A checkpoint step failed verification and was skipped (or restored unverified)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What ``CheckpointManager.restore`` returns.

    Attributes:
        step: The step restored (the latest good one unless a step was asked for).
        state: The train state, with the shardings of the restore target.
        data_state: The data iterator state saved with the step, or None.
        config: The resolved config saved with the step, or None.
        tokenizer_dir: The step's copy of the tokenizer directory, or None.
    """

    step: int
    state: Any
    data_state: dict[str, Any] | None
    config: dict[str, Any] | None
    tokenizer_dir: epath.Path | None


# --- tokenizer directory item -------------------------------------------------------------


@dataclasses.dataclass
class TokenizerDirSave(ocp.args.CheckpointArgs):
    """Saves the files of a tokenizer directory; ``files`` maps relative path -> bytes."""

    files: dict[str, bytes]


@dataclasses.dataclass
class TokenizerDirRestore(ocp.args.CheckpointArgs):
    """Restores nothing; the manager hands out the directory's path instead."""


class TokenizerDirHandler(ocp.CheckpointHandler):
    """Writes a tokenizer directory's files into the step (process 0 only).

    Files are read in ``CheckpointManager.save`` (so later edits of the source directory
    cannot race the background write) and written here, inside orbax's temporary step
    directory, so they are committed atomically with the rest of the step.
    """

    def save(self, directory: epath.Path, args: TokenizerDirSave) -> None:
        if jax.process_index() != 0:
            return
        for rel, content in args.files.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    def restore(self, directory: epath.Path, args: TokenizerDirRestore | None = None) -> str:
        del args
        return os.fspath(directory)

    def metadata(self, directory: epath.Path) -> None:
        del directory


ocp.args.register_with_handler(TokenizerDirHandler, for_save=True)(TokenizerDirSave)
ocp.args.register_with_handler(TokenizerDirHandler, for_restore=True)(TokenizerDirRestore)


# --- helpers --------------------------------------------------------------------------------


def _is_prng_key(dtype: Any) -> bool:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _stored_shape_dtype(leaf: jax.ShapeDtypeStruct) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype a target leaf has on disk (typed PRNG keys are stored as key_data)."""
    if _is_prng_key(leaf.dtype):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _abstract_target(abstract_state: Any) -> Any:
    """Turns the restore target into ShapeDtypeStructs with shardings, or raises ValueError."""
    single_process = jax.process_count() == 1

    def convert(path: tuple[Any, ...], leaf: Any) -> jax.ShapeDtypeStruct:
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            raise ValueError(
                f"restore target leaf {leaf_name(path)!r} is a {type(leaf).__name__}, not an "
                "array; pass jax.ShapeDtypeStruct leaves (e.g. from jax.eval_shape of the init "
                "function) with a .sharding"
            )
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            if not single_process:
                raise ValueError(
                    f"restore target leaf {leaf_name(path)!r} has no sharding; with several "
                    "processes every leaf needs one, e.g. "
                    "jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))"
                )
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(convert, abstract_state)


def _json_copy(value: Any, what: str) -> dict[str, Any] | None:
    """A deep JSON round-trip copy of ``value`` (so later mutation can't race the async write)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(
            f"{what} must be a JSON-able dict, got {type(value).__name__}; convert it first "
            "(e.g. dataclasses.asdict(cfg), or json.loads(state_bytes))"
        )
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{what} is not JSON-serialisable ({e}); keep only dicts, lists, str, int, float "
            "(finite), bool and None in it"
        ) from e


def _check_save_options(save_interval_steps: Any, max_to_keep: Any) -> None:
    if isinstance(save_interval_steps, bool) or not isinstance(save_interval_steps, int):
        raise TypeError(f"save_interval_steps must be an int, got {save_interval_steps!r}")
    if save_interval_steps < 1:
        raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
        raise ValueError(f"max_to_keep must be an int >= 1 or None, got {max_to_keep!r}")


def _check_step(step: Any) -> int:
    """``step`` as a Python int (ints, numpy and jax integer scalars), or ValueError."""
    try:
        index = operator.index(step)
    except TypeError:
        index = -1
    if index < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return index


def _save_items(
    state: Any,
    data_state: dict[str, Any] | None,
    config: dict[str, Any] | None,
    tokenizer_dir: str | os.PathLike | None,
) -> dict[str, ocp.args.CheckpointArgs]:
    """The orbax items of one step, less the tokenizer files; checks the inputs."""
    items: dict[str, ocp.args.CheckpointArgs] = {_STATE: ocp.args.StandardSave(state)}
    if (data := _json_copy(data_state, "data_state")) is not None:
        items[_DATA] = ocp.args.JsonSave(data)
    if (cfg := _json_copy(config, "config")) is not None:
        items[_CONFIG] = ocp.args.JsonSave(cfg)
    if tokenizer_dir is not None and not epath.Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer_dir {os.fspath(tokenizer_dir)!r} is not a directory")
    return items


def _read_tokenizer_files(tokenizer_dir: str | os.PathLike) -> dict[str, bytes]:
    root = epath.Path(tokenizer_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"tokenizer_dir {os.fspath(tokenizer_dir)!r} is not a directory")
    files: dict[str, bytes] = {}
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        for child in directory.iterdir():
            if child.is_dir():
                stack.append((child, f"{prefix}{child.name}/"))
            else:
                files[f"{prefix}{child.name}"] = child.read_bytes()
    if not files:
        raise ValueError(f"tokenizer_dir {os.fspath(tokenizer_dir)!r} has no files to save")
    return files


def _check_compatible(directory: epath.Path, step: int, metadata: Any, target: Any) -> None:
    """Raises ValueError naming the first leaves where the checkpoint and target differ."""
    stored = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(*_stored_shape_dtype(leaf)), target)
    lines = tree_mismatch(metadata, stored, limit=5, dtypes=True, want_name="the restore target")
    if lines:
        raise ValueError(
            f"checkpoint step {step} in {directory} does not match the restore target: "
            f"{'; '.join(lines)}. The checkpoint was saved with a different model/optimizer "
            "config; use a new workdir or the same config as the run that wrote it."
        )


def read_params(step_dir: str | os.PathLike, abstract_params: Any) -> Any:
    """Only the parameters of a step: an orbax partial restore of ``state['params']``.

    Read-only: no orbax ``CheckpointManager`` is opened, so nothing in the workdir (say, a
    running job's in-flight save) is touched. Works for a training step (state = a
    ``TrainState``; the optimizer state is never read) and a converted one (state =
    ``{"params": ...}``).

    Args:
        step_dir: One step directory (verify it first, e.g. with ``locate``).
        abstract_params: The parameter pytree of ``jax.ShapeDtypeStruct`` leaves; leaves
            without a sharding go to the first device, and values are cast to each leaf's
            dtype.

    Returns:
        The parameter pytree.

    Raises:
        ValueError: The step has no ``params``, or they do not fit ``abstract_params``
            (the leaves are named).
    """
    state_dir = epath.Path(step_dir) / _STATE
    handler = ocp.PyTreeCheckpointHandler()
    tree = handler.metadata(state_dir).tree
    if "params" not in tree:
        raise ValueError(
            f"{state_dir} has no 'params' (it has {sorted(tree)}); not a model checkpoint."
        )
    lines = tree_mismatch(tree["params"], abstract_params)
    if lines:
        raise ValueError(
            f"the parameters in {epath.Path(step_dir)} do not fit the model of its config: "
            f"{'; '.join(lines)}."
        )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"params": abstract_params}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(
            sharding=getattr(x, "sharding", None) or device, global_shape=x.shape, dtype=x.dtype
        ),
        target,
    )
    restored = handler.restore(
        state_dir,
        args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )
    return restored["params"]


# --- the manager -----------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores train state + data state + config + tokenizer, verified by checksums.

    Call every method on every process (orbax synchronises them); only process 0 writes the
    JSON items, the tokenizer copy and manifests, and moves corrupted steps aside.

    Example::

        ckpt = CheckpointManager(workdir, save_interval_steps=1000, max_to_keep=3)
        if ckpt.latest_step() is not None:
            restored = ckpt.restore(abstract_state)      # ShapeDtypeStructs with shardings
            state, start = restored.state, restored.step
        ...
        ckpt.save(step, state, data_state=it.get_state(), config=cfg_dict)  # no-op off-interval
        ckpt.close()
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_interval_steps: int = 1000,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        allow_unverified: bool = False,
    ):
        """Opens (creating if needed) a checkpoint workdir.

        Args:
            directory: The workdir; a rerun with the same one resumes from its latest step.
            save_interval_steps: ``save`` writes only at multiples of this (or with ``force``,
                or when orbax reports a preemption sync point).
            max_to_keep: How many most recent steps to keep; None keeps all.
            async_save: Write in the background; ``False`` makes ``save`` block until the
                step (and its manifest) is on disk.
            allow_unverified: Restore steps that have no checksum manifest (with a warning)
                instead of skipping them.
        """
        _check_save_options(save_interval_steps, max_to_keep)
        directory = epath.Path(directory)
        # orbax/tensorstore need absolute local paths; remote (gs://...) paths already are.
        self._directory = (
            directory if directory.is_absolute() else epath.Path(os.path.abspath(directory))
        )
        self._interval = save_interval_steps
        self._async = async_save
        self._allow_unverified = allow_unverified
        self._lock = threading.Lock()
        # Steps handed to orbax whose completion we have not yet processed (at most one in
        # flight, since orbax waits for the previous save before starting the next).
        self._pending: collections.deque[int] = collections.deque()
        self._checked: dict[int, Verification] = {}
        self._warned: set[int] = set()
        self._closed = False
        self._mngr = self._open_orbax(max_to_keep)

    def _open_orbax(self, max_to_keep: int | None) -> ocp.CheckpointManager:
        """The orbax manager of the workdir, one item handler per step subdirectory."""
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=self._interval,
            # Always async underneath: the manifest hook needs orbax's AsyncCheckpointer;
            # ``async_save=False`` waits right after each save instead.
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._on_finalized),
            cleanup_tmp_directories=True,
        )
        return ocp.CheckpointManager(
            self._directory,
            options=options,
            item_handlers={
                _STATE: ocp.StandardCheckpointHandler(),
                _DATA: ocp.JsonCheckpointHandler(),
                _CONFIG: ocp.JsonCheckpointHandler(),
                _TOKENIZER: TokenizerDirHandler(),
            },
        )

    # -- queries ---------------------------------------------------------------------------

    @property
    def directory(self) -> epath.Path:
        """The workdir."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Every step directory orbax sees, ascending (verified or not)."""
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The latest step that verifies (or is being saved by this manager), else None.

        Steps that fail verification are skipped with a ``CheckpointIntegrityWarning``.
        """
        with self._lock:
            in_flight = set(self._pending)
        bad: list[tuple[int, Verification]] = []
        for step in sorted(self._mngr.all_steps(), reverse=True):
            if step in in_flight or self._verify(step).ok:
                self._warn_bad(bad, fallback=step)
                return step
            bad.append((step, self._checked[step]))
        self._warn_bad(bad, fallback=None)
        return None

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write a checkpoint.

        True at multiples of ``save_interval_steps`` (and at orbax preemption sync points),
        unless the workdir already holds this or a later step not known to be corrupted.
        """
        if not self._on_interval(step):
            return False
        return not any(
            s >= step and (s not in self._checked or self._checked[s].ok)
            for s in self._mngr.all_steps()
        )

    def tokenizer_dir(self, step: int) -> epath.Path | None:
        """The copy of the tokenizer directory saved with ``step``, or None."""
        path = self._directory / str(step) / _TOKENIZER
        return path if path.is_dir() else None

    # -- save ------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        force: bool = False,
    ) -> bool:
        """Saves one step if the interval (or ``force``) says so.

        Args:
            step: The training step, >= 0.
            state: A pytree of jax arrays (params, optimizer state, step, PRNG keys; typed
                keys are fine).
            data_state: The data iterator state, a JSON-able dict.
            config: The resolved config, a JSON-able dict.
            tokenizer_dir: A directory whose files are copied into the step.
            force: Save even off the interval.

        Returns:
            True if a save was started. False off-interval, when this step is already saved,
            or (with a warning) when the workdir holds a later good step.

        Raises:
            TypeError: ``data_state``/``config`` are not JSON-able dicts.
            FileNotFoundError: ``tokenizer_dir`` is not a directory.
        """
        if self._closed:
            raise RuntimeError("save() on a closed CheckpointManager; open a new one")
        step = _check_step(step)
        # Inputs are checked on every call (cheap), so a bad one fails at the first step
        # rather than at the first save; the tokenizer files are read only when saving.
        items = _save_items(state, data_state, config, tokenizer_dir)
        if not force and not self._on_interval(step):
            return False
        if tokenizer_dir is not None:
            items[_TOKENIZER] = TokenizerDirSave(_read_tokenizer_files(tokenizer_dir))
        self.wait_until_finished()
        if not self._make_room(step):
            return False
        return self._start_save(step, items)

    def _on_interval(self, step: int) -> bool:
        return step % self._interval == 0 or self._mngr.reached_preemption(step)

    def _make_room(self, step: int) -> bool:
        """Whether ``step`` may be saved; moves aside the bad steps at or after it.

        False (with a warning for a later step) when this or a later step is good: orbax
        only appends steps.
        """
        blocking = [s for s in sorted(self._mngr.all_steps()) if s >= step]
        good = [s for s in blocking if self._verify(s).ok]
        if step in good:
            return False
        if good:
            warnings.warn(
                f"not saving step {step}: {self._directory} already holds the later good "
                f"checkpoint step {good[-1]}; orbax only appends steps. Restore the latest step "
                "to continue, or use a new workdir.",
                stacklevel=3,
            )
            return False
        if blocking:
            self._quarantine(blocking)
        return True

    def _start_save(self, step: int, items: dict[str, ocp.args.CheckpointArgs]) -> bool:
        """Hands the step to orbax, tracked as pending until its manifest is written."""
        with self._lock:
            self._pending.append(step)
            self._checked.pop(step, None)
        try:
            saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        except BaseException:
            with self._lock:
                self._pending.remove(step)
            raise
        if not saved:
            with self._lock:
                self._pending.remove(step)
        elif not self._async:
            self.wait_until_finished()
        return saved

    def wait_until_finished(self) -> None:
        """Blocks until the in-flight save is on disk and its manifest is written."""
        self._mngr.wait_until_finished()
        self._flush_manifests()

    def close(self) -> None:
        """Finishes the in-flight save (every step saved here then has a manifest)."""
        if self._closed:
            return
        self.wait_until_finished()
        self._mngr.close()
        self._closed = True

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- restore ---------------------------------------------------------------------------

    def restore(self, abstract_state: Any, step: int | None = None) -> Restored:
        """Restores a step onto the shardings of ``abstract_state``.

        Args:
            abstract_state: The state's pytree with ``jax.ShapeDtypeStruct`` leaves carrying
                ``.sharding`` (any mesh; it need not match the one that saved). Leaves without
                a sharding go to the first device (single process only).
            step: The step to restore; None means the latest step that verifies, falling
                back past corrupted steps with a ``CheckpointIntegrityWarning``.

        Returns:
            A ``Restored`` with the state, data state, config and tokenizer directory.

        Raises:
            FileNotFoundError: The workdir has no checkpoint, or not the requested step.
            ValueError: No step verifies, the requested step is corrupted, or the
                checkpoint's tree/shapes/dtypes differ from ``abstract_state`` (the message
                names the leaf).
        """
        target = _abstract_target(abstract_state)
        self.wait_until_finished()
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if step is None:
            step = self._latest_good_or_raise(steps)
        else:
            if step not in steps:
                raise FileNotFoundError(
                    f"no checkpoint step {step} in {self._directory}; it has steps {sorted(steps)}"
                )
            check = self._verify(step)
            if not check.ok:
                raise ValueError(
                    f"checkpoint step {step} in {self._directory} {check.reason}; restore "
                    "another step (step=None picks the latest good one)"
                )
        step_dir = self._directory / str(step)
        metadata = self._mngr.item_metadata(step)[_STATE]
        _check_compatible(self._directory, step, getattr(metadata, "tree", metadata), target)
        args = {_STATE: ocp.args.StandardRestore(target)}
        for name in (_DATA, _CONFIG):
            if (step_dir / name).is_dir():
                args[name] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**args))
        return Restored(
            step=step,
            state=out[_STATE],
            data_state=out[_DATA] if _DATA in args else None,
            config=out[_CONFIG] if _CONFIG in args else None,
            tokenizer_dir=self.tokenizer_dir(step),
        )

    # -- internals -------------------------------------------------------------------------

    def _latest_good_or_raise(self, steps_desc: list[int]) -> int:
        if not steps_desc:
            raise FileNotFoundError(
                f"no checkpoint in {self._directory}; train first, or pass the workdir of a run "
                "that saved one"
            )
        bad: list[tuple[int, Verification]] = []
        for step in steps_desc:
            if self._verify(step).ok:
                self._warn_bad(bad, fallback=step)
                return step
            bad.append((step, self._checked[step]))
        self._warn_bad(bad, fallback=None)
        detail = "; ".join(f"step {s} {v.reason}" for s, v in bad)
        hint = (
            " Pass allow_unverified=True to restore steps that merely lack a manifest."
            if any(not v.has_manifest for _, v in bad)
            else ""
        )
        raise ValueError(
            f"no checkpoint in {self._directory} passes verification: {detail}. Restore the "
            f"workdir from a backup or start a new one.{hint}"
        )

    def _verify(self, step: int) -> Verification:
        """Verifies a step (cached; process 0 decides and broadcasts with several processes)."""
        with self._lock:
            if step in self._checked:
                return self._checked[step]
        primary = jax.process_index() == 0
        check = Verification(False, "was not verified on this process")
        if primary:
            check = verify_step_dir(self._directory / str(step), step)
            if not check.ok and not check.has_manifest and self._allow_unverified:
                if step not in self._warned:
                    self._warned.add(step)
                    warnings.warn(
                        f"checkpoint step {step} in {self._directory} {check.reason}; using it "
                        "unverified because allow_unverified=True",
                        CheckpointIntegrityWarning,
                        stacklevel=3,
                    )
                check = Verification(True, has_manifest=False)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = np.array([check.ok, check.has_manifest], dtype=np.int32)
            flags = np.asarray(multihost_utils.broadcast_one_to_all(flags))
            if not primary:
                check = Verification(
                    bool(flags[0]),
                    "" if flags[0] else "failed verification on process 0 (see its warnings)",
                    has_manifest=bool(flags[1]),
                )
        with self._lock:
            self._checked[step] = check
        return check

    def _warn_bad(self, bad: list[tuple[int, Verification]], fallback: int | None) -> None:
        then = f"falling back to step {fallback}" if fallback is not None else "no good step left"
        for step, check in bad:
            if step in self._warned:
                continue
            self._warned.add(step)
            warnings.warn(
                f"checkpoint step {step} in {self._directory} is corrupted or unverified: it "
                f"{check.reason}; {then}",
                CheckpointIntegrityWarning,
                stacklevel=3,
            )

    def _quarantine(self, steps: list[int]) -> None:
        """Moves bad steps to ``<workdir>/corrupted/`` so orbax stops counting them."""
        if jax.process_index() == 0:
            root = self._directory / QUARANTINE_DIR
            root.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dest = root / str(step)
                n = 1
                while dest.exists():
                    dest, n = root / f"{step}-{n}", n + 1
                (self._directory / str(step)).rename(dest)
                warnings.warn(
                    f"moved corrupted checkpoint step {step} to {dest} so that step {step} and "
                    "later can be saved again; delete it once inspected",
                    CheckpointIntegrityWarning,
                    stacklevel=4,
                )
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("llm_jax_checkpoint_quarantine")
        self._mngr.reload()
        with self._lock:
            for step in steps:
                self._checked.pop(step, None)
                self._warned.discard(step)

    def _on_finalized(self) -> None:
        """Orbax hook, process 0, background thread: data written, step not yet committed.

        Writes the manifest into the temporary step directory so the commit (an atomic
        rename locally; a commit marker on object stores) publishes data and manifest
        together. Never raises: a failure here would abort the commit, and
        ``_flush_manifests`` writes any missing manifest after the save completes.
        """
        try:
            with self._lock:
                step = self._pending[-1] if self._pending else None
            if step is None:
                return
            tmp = self._directory / f"{step}{_TMP_SUFFIX}"
            write_manifest(tmp if tmp.is_dir() else self._directory / str(step), step)
        except Exception as e:
            warnings.warn(
                f"could not write the checksum manifest while committing a checkpoint ({e!r}); "
                "it will be written once the save completes",
                CheckpointIntegrityWarning,
                stacklevel=1,
            )

    def _flush_manifests(self) -> None:
        """After orbax finished: make sure every step saved here has a manifest."""
        with self._lock:
            done = list(self._pending)
            self._pending.clear()
        for step in done:
            step_dir = self._directory / str(step)
            if not step_dir.is_dir():  # deleted by keep-N already
                continue
            if jax.process_index() == 0 and not (step_dir / MANIFEST_NAME).exists():
                write_manifest(step_dir, step)
            with self._lock:
                # Written by this process moments ago: trusted without re-hashing.
                self._checked[step] = Verification(True)
