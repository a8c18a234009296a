"""tcmalloc for CPU training.

XLA:CPU allocates each step's temporaries (the compiled step's `temp_size_in_bytes`) afresh
on every call. glibc serves a block over its mmap threshold (dynamic, 32 MiB at most) with a
fresh mmap and unmaps it on free, so every step page-faults its temporaries in again;
tcmalloc keeps freed memory for reuse. So `allocator_hint` gives its tip when the
temporaries reach 32 MiB: below that no block of them can pass glibc's threshold.

Measured on the 2-core development machine (see `benchmarks/README.md`): a gpt2-small step
(4x256, `benchmarks/train_step.py` with its oneDNN XLA flags, ~2 GB of temporaries) took
5.75 s under glibc and 3.48 s under tcmalloc; `configs/tiny.yaml` (185 MiB of temporaries)
trained a median 15% faster over 8 alternating pairs of 40-step runs (-25% to +71% on the
busy machine), its kernel time down from ~3.6 s to ~1.0 s per run.

The allocator is chosen when the process starts (`LD_PRELOAD`), so the library can only say
how; it does not re-execute anything.
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
    from the compiled step's memory analysis) reach glibc's largest mmap threshold, 32 MiB
    (the tiny configs' ~185 MiB included); else None."""
    if backend != "cpu" or "tcmalloc" in environ.get("LD_PRELOAD", ""):
        return None
    if temp_bytes < GLIBC_MMAP_THRESHOLD:
        return None
    path = find_tcmalloc(dirs)
    if path is None:
        how = "apt-get install libtcmalloc-minimal4, then run with LD_PRELOAD=<its .so>"
    else:
        how = f"run with LD_PRELOAD={path}"
    return (
        f"tip: the compiled step allocates {_size(temp_bytes)} of temporaries, which glibc "
        f"maps afresh on every step; on CPU that runs faster under tcmalloc: {how}"
    )


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
