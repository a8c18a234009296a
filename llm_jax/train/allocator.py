"""tcmalloc for CPU training.

XLA:CPU allocates each step's temporaries afresh (~2 GB for gpt2-small at 4x256). glibc
serves blocks over 32 MiB with a fresh mmap and unmaps them on free, so every step
page-faults its temporaries in again; tcmalloc keeps freed memory for reuse. On the 2-core
development machine a gpt2-small step (4x256, `benchmarks/train_step.py` with its oneDNN
XLA flags) took 5.75 s under glibc and 3.48 s under tcmalloc. Steps whose temporaries stay
under glibc's 32 MiB mmap threshold (the tiny configs) gain nothing. The allocator is
chosen when the process starts (`LD_PRELOAD`), so the library can only say how; it does
not re-execute anything.
"""

from __future__ import annotations

import os

TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
TCMALLOC_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
)


def find_tcmalloc(dirs: tuple[str, ...] = TCMALLOC_DIRS) -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    for directory in dirs:
        for name in TCMALLOC_NAMES:
            path = os.path.join(directory, name)
            if os.path.exists(path):
                return path
    return None


GLIBC_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic mmap threshold


def allocator_hint(
    backend: str,
    temp_bytes: int,
    environ=os.environ,
    dirs: tuple[str, ...] = TCMALLOC_DIRS,
) -> str | None:
    """A one-line tip for CPU runs not under tcmalloc whose step temporaries (`temp_bytes`,
    from the compiled step's memory analysis) reach glibc's mmap threshold; else None."""
    if backend != "cpu" or "tcmalloc" in environ.get("LD_PRELOAD", ""):
        return None
    if temp_bytes < GLIBC_MMAP_THRESHOLD:
        return None
    path = find_tcmalloc(dirs)
    if path is None:
        how = "apt-get install libtcmalloc-minimal4, then run with LD_PRELOAD=<its .so>"
    else:
        how = f"run with LD_PRELOAD={path}"
    gib = temp_bytes / 2**30
    return (
        f"tip: this step allocates {gib:.1f} GiB of temporaries; on CPU that runs faster "
        f"under tcmalloc: {how}"
    )
