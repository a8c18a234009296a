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


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> str:
    """A token-cache folder shared by the tests of one module."""
    return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="session")
def shakespeare_prefix(shared_data, tmp_path_factory):
    """`(n) -> Path` of a file holding the first n characters of tiny-Shakespeare."""
    text = (shared_data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    made: dict[int, Path] = {}

    def make(n: int) -> Path:
        if n not in made:
            made[n] = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
            made[n].write_text(text[:n], encoding="utf-8")
        return made[n]

    return make
