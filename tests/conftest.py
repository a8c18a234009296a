"""Test setup: 8 fake CPU devices and fast compiles, set once before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "")
# Fast compiles: tests use tiny shapes, so backend optimisation time dominates otherwise.
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_num_cpu_devices", 8)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora beside the project (../shared/data)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"expected the shared corpora at {SHARED_DATA}")
    return SHARED_DATA
