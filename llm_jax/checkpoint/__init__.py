"""Checkpoints: orbax save/restore/resume with checksum manifests and corruption fallback.

``CheckpointManager`` is the whole interface the trainer needs; ``manifest`` holds the
file-level integrity check on its own (usable on any step directory).
"""

from llm_jax.checkpoint.manager import CheckpointIntegrityWarning, CheckpointManager, Restored
from llm_jax.checkpoint.manifest import (
    MANIFEST_NAME,
    Verification,
    build_manifest,
    verify_step_dir,
    write_manifest,
)

__all__ = [
    "MANIFEST_NAME",
    "CheckpointIntegrityWarning",
    "CheckpointManager",
    "Restored",
    "Verification",
    "build_manifest",
    "verify_step_dir",
    "write_manifest",
]
