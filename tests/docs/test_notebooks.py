"""Every notebook under docs/notebooks runs top to bottom (executed with
nbclient on a real Jupyter kernel), and every docstring example in the
package passes as a doctest, so a broken example fails CI even when the docs
are not built."""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil

import pytest

import lepton_jax

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")
# The quickstart trains a CNN for long enough that -O2 pays for its compile
# (kernel CPU: 12.7 s at the suite's -O0, 10.4 s at -O2); the other notebooks
# are cheaper at -O0 (tests/conftest.py).
COMPUTE_BOUND = {"quickstart.md"}
NOTEBOOKS = [pytest.param(name, marks=pytest.mark.compute_bound) if name in COMPUTE_BOUND else name
             for name in sorted(os.listdir(os.path.join(DOCS, "notebooks"))) if name.endswith(".md")]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch, subprocess_env):
    jupytext = pytest.importorskip("jupytext", reason="the dev extra installs jupytext")
    nbclient = pytest.importorskip("nbclient", reason="the dev extra installs nbclient")
    # A shorter run of the training loops (the docs build runs them in full);
    # every cell still executes. The kernel starts from a clean device setup
    # (one device, the suite's compile flags).
    monkeypatch.setenv("LEPTON_DOCS_FAST", "1")
    monkeypatch.setenv("XLA_FLAGS", subprocess_env["XLA_FLAGS"])
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    path = os.path.join(DOCS, "notebooks", name)
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs) or name in NO_PLOTS, f"{name} shows no figure"


NO_PLOTS = {"custom_layers.md", "checkpoints.md"}


def _modules():
    for info in pkgutil.walk_packages(lepton_jax.__path__, "lepton_jax."):
        yield info.name


def test_docstring_examples():
    attempted = 0
    failures = []
    for name in _modules():
        module = importlib.import_module(name)
        for test in doctest.DocTestFinder(exclude_empty=True).find(module, name):
            if not test.examples:
                continue
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            result = runner.run(test, out=lambda text: failures.append(text))
            attempted += result.attempted
    assert not failures, "\n".join(failures)
    assert attempted >= 10, f"only {attempted} docstring examples found"
