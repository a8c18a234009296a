"""Test setup: 8 fake CPU devices and fast compiles, set once before JAX starts."""

import os

os.environ.setdefault("XLA_FLAGS", "")
# Fast compiles: tests use tiny shapes, so backend optimisation time dominates otherwise.
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import atexit
import shutil
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
# One persistent XLA cache per test process, removed when it exits: the many tests that
# train, resume and reload the same tiny configs (each run builds its jitted steps afresh)
# load a program compiled earlier instead of compiling it again. A loaded program is the
# compiled one, so results are bit for bit the same; nothing outlives the session.
_XLA_CACHE = tempfile.mkdtemp(prefix="llm_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


TEST_DATA = Path(__file__).resolve().parent / "data"
_NO_SHARED = f"the whole corpora are not at {SHARED_DATA} (a bare clone)"


def pytest_sessionstart(session) -> None:
    # CI always has ../shared beside the clone: its absence there is a broken setup.
    if os.environ.get("CI") and not SHARED_DATA.is_dir():
        raise pytest.UsageError(f"CI is set but {_NO_SHARED}; CI runs with ../shared beside it.")


@pytest.fixture(scope="session")
def corpora() -> Path:
    """The small public-domain excerpts in tests/data (shakespeare.txt, bible-en-es.tsv):
    what tests read, so that the suite runs the same with or without ../shared."""
    return TEST_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The whole corpora beside the project (../shared/data), for the few tests that need
    them entire: skipped on a bare clone, a failure when CI is set."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {_NO_SHARED}; CI runs with ../shared beside it.")
        pytest.skip(f"{_NO_SHARED}; this test needs them whole")
    return SHARED_DATA


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> str:
    """A token-cache folder shared by the tests of one module."""
    return str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(scope="session")
def shakespeare(corpora, tmp_path_factory) -> Path:
    """The tests/data excerpt of tiny-Shakespeare (~200 KB), as a file of its own (the
    tests write token caches beside their corpus)."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare.txt"
    path.write_text((corpora / "shakespeare.txt").read_text(encoding="utf-8"), encoding="utf-8")
    return path
