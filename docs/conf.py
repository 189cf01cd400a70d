"""Sphinx configuration: MyST-NB executes the notebooks under notebooks/;
the API pages and the benchmark tables are generated at build time from the
packages' ``__all__`` and from ``benchmarks/results/*.json``."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import lepton_jax  # noqa: E402
os.environ.setdefault("XLA_FLAGS", "")

project = "lepton_jax"
author = "the lepton_jax authors"
copyright = "2026, the lepton_jax authors"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
html_theme = "furo"
html_title = "lepton_jax"
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
nb_execution_mode = "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
suppress_warnings = ["mystnb.unknown_mime_type", "config.cache", "myst.header"]

# Every public subpackage and the objects its __all__ exports, plus the
# public modules that are their own API (kernel dispatch, checkpoint paths).
API_PACKAGES = []
for _name in [*lepton_jax.SUBPACKAGES, "ops.dispatch", "checkpoint.paths"]:
    try:
        importlib.import_module(f"lepton_jax.{_name}")
        API_PACKAGES.append(f"lepton_jax.{_name}")
    except ImportError:  # an optional dependency (serving) is not installed
        pass


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", "")
                 .startswith(module.__name__) and (inspect.isfunction(v) or inspect.isclass(v))]
    return [n for n in names if not inspect.ismodule(getattr(module, n))]


def _directive(obj) -> str:
    if inspect.isclass(obj):
        return "autoclass"
    if callable(obj):
        return "autofunction"
    return "autodata"


def write_api_pages() -> None:
    """One page per package listing every public name with its docstring."""
    out_dir = os.path.join(os.path.dirname(__file__), "api")
    os.makedirs(out_dir, exist_ok=True)
    index = ["# API reference", "", "Every public name of every subpackage, from its docstring.", "",
             "```{toctree}", ":maxdepth: 1", ""]
    for package in API_PACKAGES:
        module = importlib.import_module(package)
        short = package.split(".", 1)[1].replace(".", "_")
        lines = [f"# `{package}`", "", "```{eval-rst}", f".. automodule:: {package}", "   :no-members:", "```", ""]
        for name in _public_names(module):
            obj = getattr(module, name)
            if not inspect.isclass(obj) and not callable(obj):
                # A constant: its type's docstring would be wrong; use the
                # comment above its definition and its value.
                lines += ["```{eval-rst}", f".. py:data:: {package}.{name}", f"   :type: {type(obj).__name__}", ""]
                lines += ["   " + line for line in _comment_above(package, name)] or ["   A constant."]
                lines += ["```", ""]
                continue
            lines += ["```{eval-rst}", f".. {_directive(obj)}:: {package}.{name}"]
            if inspect.isclass(obj):
                lines.append("   :members:")
            lines += ["```", ""]
        _write_if_changed(os.path.join(out_dir, f"{short}.md"), "\n".join(lines))
        index.append(short)
    index += ["```", ""]
    _write_if_changed(os.path.join(out_dir, "index.md"), "\n".join(index))


def _comment_above(package: str, name: str) -> list[str]:
    """The ``#`` comment lines right above ``NAME = ...`` in the package's modules."""
    import pkgutil

    module = importlib.import_module(package)
    candidates = [module.__name__]
    if hasattr(module, "__path__"):
        candidates += [info.name for info in pkgutil.iter_modules(module.__path__, package + ".")]
    for candidate in candidates:
        try:
            source = inspect.getsource(importlib.import_module(candidate)).splitlines()
        except (OSError, TypeError, ImportError):
            continue
        for i, line in enumerate(source):
            if line.startswith(f"{name}:") or line.startswith(f"{name} ="):
                comments = []
                j = i - 1
                while j >= 0 and source[j].startswith("#"):
                    comments.insert(0, source[j].lstrip("# ").rstrip())
                    j -= 1
                return [" ".join(comments)] if comments else []
    return []


def write_benchmark_tables() -> None:
    """``_generated/benchmark_tables.md`` from ``benchmarks/results/*.json``."""
    results_dir = os.path.join(ROOT, "benchmarks", "results")
    lines = []
    files = sorted(f for f in os.listdir(results_dir) if f.endswith((".json", ".jsonl"))) if os.path.isdir(
        results_dir) else []
    if not files:
        lines.append("No benchmark results are committed yet.")
    for name in files:
        with open(os.path.join(results_dir, name), encoding="utf-8") as f:
            text = f.read()
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if name.endswith(".jsonl") \
            else [json.loads(text)]
        lines += [f"## `{name}`", ""]
        for record in records:
            lines += _record_table(record) + [""]
    out = os.path.join(os.path.dirname(__file__), "_generated", "benchmark_tables.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    _write_if_changed(out, "\n".join(lines))


def _flatten(record, prefix=""):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _record_table(record) -> list[str]:
    rows = ["| field | value |", "|---|---|"]
    for key, value in _flatten(record):
        if isinstance(value, float):
            value = f"{value:.4g}"
        rows.append(f"| {key} | {str(value).replace('|', '/')} |")
    return rows


def _write_if_changed(path: str, text: str) -> None:
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


write_api_pages()
write_benchmark_tables()
