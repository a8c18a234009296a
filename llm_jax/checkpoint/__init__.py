"""Checkpoints: orbax save/restore/resume with checksum manifests and corruption fallback.

``CheckpointManager`` is the whole interface the trainer needs; ``manifest`` holds the
file-level integrity check on its own (usable on any step directory); ``locate`` finds a
verified step read-only (for sampling, conversion and fine-tuning), ``read_params`` reads
only its parameters, and ``trees.tree_mismatch`` is the one tree/shape comparison.
"""

from llm_jax.checkpoint.locate import StepRef, locate
from llm_jax.checkpoint.manager import (
    CheckpointIntegrityWarning,
    CheckpointManager,
    Restored,
    read_params,
)
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
    "StepRef",
    "Verification",
    "build_manifest",
    "locate",
    "read_params",
    "verify_step_dir",
    "write_manifest",
]
