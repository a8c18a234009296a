"""Checksum manifests for checkpoint step directories.

Orbax writes no data checksums, so every step directory we save gets one JSON file,
``llm_jax_manifest.json``, listing the size and SHA-256 of every file in the step::

    {"format": "llm_jax.checkpoint.manifest", "version": 1, "step": 1200,
     "algorithm": "sha256",
     "files": {"state/manifest.ocdbt": {"size": 113, "sha256": "9f2c..."}, ...}}

Paths are POSIX paths relative to the step directory. Two files at the step root are left
out: ``_CHECKPOINT_METADATA`` and ``commit_success.txt``. Orbax (re)writes both when it
commits the step, which is after the manifest is written (the manifest goes into the
temporary directory, so the atomic rename commits it with the data); verification only
checks that ``_CHECKPOINT_METADATA``, when present, still parses as JSON.

Verification reads every file back, so it costs one sequential read of the checkpoint;
files are hashed on a few threads (hashlib releases the GIL).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from typing import Any

from etils import epath

MANIFEST_NAME = "llm_jax_manifest.json"
MANIFEST_FORMAT = "llm_jax.checkpoint.manifest"
MANIFEST_VERSION = 1
# Files orbax rewrites at commit time, after our manifest exists (see module docstring).
COMMIT_FILES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})

_CHUNK_BYTES = 8 * 1024 * 1024
_MAX_REASONS = 3


@dataclasses.dataclass(frozen=True)
class Verification:
    """The outcome of checking one step directory against its manifest.

    Attributes:
        ok: True when every file matches the manifest.
        reason: Why the step failed (empty when ``ok``), phrased to follow "step N ...".
        has_manifest: False when the step has no manifest at all (never verified).
    """

    ok: bool
    reason: str = ""
    has_manifest: bool = True


def _list_files(step_dir: epath.Path) -> list[str]:
    """Relative POSIX paths of every file under ``step_dir`` that the manifest covers."""
    out = []
    stack = [(step_dir, "")]
    while stack:
        directory, prefix = stack.pop()
        for child in directory.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                stack.append((child, rel + "/"))
            elif not prefix and (child.name in COMMIT_FILES or child.name == MANIFEST_NAME):
                continue
            else:
                out.append(rel)
    return sorted(out)


def _hash_all(step_dir: epath.Path, rel_paths: list[str]) -> dict[str, dict[str, Any]]:
    """``{rel_path: {"size": bytes, "sha256": hex}}`` for each path, hashed in parallel."""

    def entry(rel: str) -> dict[str, Any]:
        path = step_dir / rel
        # Size and digest come from the same read, so a concurrent truncation can't pair a
        # new size with an old digest.
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
        return {"size": size, "sha256": digest.hexdigest()}

    workers = max(1, min(8, os.cpu_count() or 1, len(rel_paths)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        entries = list(pool.map(entry, rel_paths))
    return dict(zip(rel_paths, entries, strict=True))


def build_manifest(step_dir: str | os.PathLike, step: int) -> dict[str, Any]:
    """Hashes every file of a step directory.

    Args:
        step_dir: The step directory (final or orbax's temporary one).
        step: The training step it holds, recorded so a renamed/copied step is caught.

    Returns:
        The manifest as a JSON-able dict (format in the module docstring).
    """
    step_dir = epath.Path(step_dir)
    files = _hash_all(step_dir, _list_files(step_dir))
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": int(step),
        "algorithm": "sha256",
        "files": files,
    }


def write_manifest(step_dir: str | os.PathLike, step: int) -> dict[str, Any]:
    """Hashes a step directory and writes ``llm_jax_manifest.json`` into it.

    The file is written under a temporary name and renamed, so a reader never sees half
    a manifest.

    Args:
        step_dir: The step directory.
        step: The training step it holds.

    Returns:
        The manifest that was written.
    """
    step_dir = epath.Path(step_dir)
    manifest = build_manifest(step_dir, step)
    tmp = step_dir / (MANIFEST_NAME + ".partial")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.rename(step_dir / MANIFEST_NAME)
    return manifest


def _read_manifest(step_dir: epath.Path, step: int) -> tuple[dict[str, Any] | None, str]:
    """Returns ``(manifest, "")`` or ``(None, reason)``."""
    try:
        manifest = json.loads((step_dir / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"has an unreadable checksum manifest ({type(e).__name__}: {e})"
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None, f"has a {MANIFEST_NAME} that is not an llm_jax checksum manifest"
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("algorithm") != "sha256":
        return None, (
            f"has a checksum manifest of version {manifest.get('version')!r} / algorithm "
            f"{manifest.get('algorithm')!r}; this llm_jax reads version {MANIFEST_VERSION}, "
            "sha256"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    ):
        return None, "has a checksum manifest whose 'files' table is malformed"
    if manifest.get("step") != step:
        return None, (
            f"has the checksum manifest of step {manifest.get('step')!r} (the directory was "
            "renamed or copied from another step)"
        )
    return manifest, ""


def verify_step_dir(step_dir: str | os.PathLike, step: int) -> Verification:
    """Checks a finalized step directory against its manifest.

    A step fails when its manifest is missing or unreadable, when any listed file is
    missing, has another size (truncated/extended) or another SHA-256 (bytes changed),
    when a file that the manifest does not list has appeared, or when orbax's
    ``_CHECKPOINT_METADATA`` no longer parses as JSON.

    Args:
        step_dir: The step directory.
        step: The step it should hold.

    Returns:
        A ``Verification``; ``reason`` names the files at fault.
    """
    step_dir = epath.Path(step_dir)
    if not step_dir.is_dir():
        return Verification(False, f"has no directory at {step_dir}")
    if not (step_dir / MANIFEST_NAME).exists():
        return Verification(
            False,
            f"has no checksum manifest ({MANIFEST_NAME}): it was written by another tool, or "
            "by a run that stopped before the manifest was written, so it cannot be verified",
            has_manifest=False,
        )
    manifest, reason = _read_manifest(step_dir, step)
    if manifest is None:
        return Verification(False, reason)

    problems = _file_problems(step_dir, manifest["files"])
    metadata = step_dir / "_CHECKPOINT_METADATA"
    if metadata.exists():
        try:
            json.loads(metadata.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            problems.append("orbax's _CHECKPOINT_METADATA is not valid JSON")
    if not problems:
        return Verification(True)
    shown = "; ".join(problems[:_MAX_REASONS])
    more = len(problems) - _MAX_REASONS
    # Reasons read after "it" ("step 3 is corrupted: it fails its checksums: ...").
    return Verification(
        False,
        "fails its checksums: " + shown + (f"; and {more} more problem(s)" if more > 0 else ""),
    )


def _file_problems(step_dir: epath.Path, expected: dict[str, dict[str, Any]]) -> list[str]:
    """How the files of ``step_dir`` differ from the manifest's ``files`` table."""
    present = set(_list_files(step_dir))
    problems = [f"file {rel} is missing" for rel in sorted(set(expected) - present)]
    problems += [f"file {rel} is not in the manifest" for rel in sorted(present - set(expected))]
    common = sorted(present & set(expected))
    # Sizes first: cheap, and a size change needs no hashing to be reported.
    same_size = []
    for rel in common:
        size = (step_dir / rel).stat().length
        if size != expected[rel]["size"]:
            problems.append(
                f"file {rel} has {size} bytes, the manifest says {expected[rel]['size']} "
                "(truncated or overwritten)"
            )
        else:
            same_size.append(rel)
    for rel, got in _hash_all(step_dir, same_size).items():
        if got["size"] != expected[rel]["size"]:
            problems.append(f"file {rel} changed size while being verified")
        elif got["sha256"] != expected[rel]["sha256"]:
            problems.append(f"file {rel} has a different sha256 than the manifest (bytes changed)")
    return problems
