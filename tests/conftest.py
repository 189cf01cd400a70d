"""Test-process setup, done before anything imports jax.

* Every test process sees 8 CPU devices, so SPMD tests can build real meshes;
  unsharded code still runs on device 0.
* XLA's CPU backend compiles with LLVM -O2 instead of its default -O3. On CPU
  compilation is most of the suite's time, and -O3's extra passes cost 3-6x
  on the small programs tests make (a ``jax.random.normal`` of a new shape:
  0.95 s at -O3, 0.17 s at -O2) for no change in the numbers: both levels
  compile IEEE arithmetic without fast-math, and a GPT trained five steps
  gives bitwise the same parameters at either level (checked when this was
  chosen; -O0 does not, so it is not used).
* One XLA compilation cache per test run, shared by the xdist workers and the
  processes the tests start (notebook kernels, workers, servers): a recipe
  resumed in a test compiles the same train step again. The cache starts
  empty in a new temporary folder at every run and is removed at the end, so
  nothing carries over between runs.

``LEPTON_TEST_XLA_CACHE=0`` turns the cache off; an ``XLA_FLAGS`` that already
names ``--xla_backend_optimization_level`` keeps its own level.
"""

import os
import shutil
import tempfile

import pytest

_COMPILE_FLAGS = "--xla_backend_optimization_level=2"
if "LEPTON_TEST_XLA_FLAGS" not in os.environ:
    # The flags for every process of the run, without the device count.
    own = os.environ.get("XLA_FLAGS", "")
    os.environ["LEPTON_TEST_XLA_FLAGS"] = own if "xla_backend_optimization_level" in own else \
        f"{own} {_COMPILE_FLAGS}".strip()
    os.environ["XLA_FLAGS"] = f"{os.environ['LEPTON_TEST_XLA_FLAGS']} --xla_force_host_platform_device_count=8"

_CACHE_OWNER = False
if os.environ.get("LEPTON_TEST_XLA_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # The first process (pytest's controller) makes the folder; the xdist
    # workers and every subprocess inherit it through the environment.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lepton-jax-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    _CACHE_OWNER = True


def pytest_unconfigure(config):
    if _CACHE_OWNER:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """The environment for a process a test starts: one CPU device (no
    simulated mesh), the suite's compile flags and its compilation cache."""
    return {**os.environ, "XLA_FLAGS": os.environ["LEPTON_TEST_XLA_FLAGS"]}
