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


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
    """A persistent XLA cache for one module, off again after it: for modules whose tests
    retrain, resume and reload the same tiny configs (each run builds its jitted steps
    afresh), which then load the programs compiled earlier instead of compiling them
    again. A loaded program is the compiled one, so results are bit for bit the same.
    Not suite-wide: computing every compile's cache key costs ~3% where nothing repeats."""
    from jax.experimental.compilation_cache import compilation_cache

    saved = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
    )
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
    compilation_cache.reset_cache()
