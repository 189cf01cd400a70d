"""The suite's own compile setup (tests/conftest.py): tests compile at LLVM
-O0, and ``compute_bound`` tests at -O2, both in their own process (through
XLA's per-compile option overrides) and in the processes they start."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import compiler

LEVEL = "xla_backend_optimization_level"
pytestmark = pytest.mark.skipif(os.environ.get("LEPTON_TEST_OWN_LEVEL") == "1",
                                reason="XLA_FLAGS chose their own optimization level for every test")


def _overrides_of_a_new_compile(monkeypatch) -> dict:
    """The option overrides XLA received for a program compiled now."""
    seen = []
    patched = compiler.get_compile_options

    def spy(*args, **kwargs):
        options = patched(*args, **kwargs)
        seen.append(dict(options.env_option_overrides))
        return options

    monkeypatch.setattr(compiler, "get_compile_options", spy)
    jax.jit(lambda x: jnp.tanh(x) * 3.0).lower(np.ones(5, np.float32)).compile()
    assert len(seen) == 1, "jax no longer compiles through compiler.get_compile_options"
    return seen[0]


def test_tests_and_their_processes_compile_at_o0(monkeypatch, subprocess_env):
    assert f"--{LEVEL}=0" in os.environ["XLA_FLAGS"].split()
    assert f"--{LEVEL}=0" in subprocess_env["XLA_FLAGS"].split()
    assert LEVEL not in _overrides_of_a_new_compile(monkeypatch)


@pytest.mark.compute_bound
def test_compute_bound_tests_and_their_processes_compile_at_o2(monkeypatch, subprocess_env):
    assert _overrides_of_a_new_compile(monkeypatch)[LEVEL] in (2, "2")
    assert f"--{LEVEL}=2" in subprocess_env["XLA_FLAGS"].split()
    assert f"--{LEVEL}=0" not in subprocess_env["XLA_FLAGS"].split()
