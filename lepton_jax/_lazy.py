"""Lazy package attributes (PEP 562): a subpackage or a name is imported the
first time it is used, so ``import lepton_jax`` costs nothing and loading an
exported model does not import the training stack."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence


def attach(package: str, *, submodules: Sequence[str] = (),
           names: Mapping[str, str] | None = None) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``submodules`` are imported
    as ``package.<name>``; each of ``names`` maps an attribute to the module
    (relative to ``package``) that defines it."""
    names = dict(names or {})
    submodules = tuple(submodules)

    def __getattr__(name: str) -> Any:
        if name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        elif name in names:
            value = getattr(importlib.import_module(f"{package}.{names[name]}"), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # Cache it, so the next lookup is a plain module attribute.
        importlib.import_module(package).__dict__[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*importlib.import_module(package).__dict__, *submodules, *names})

    return __getattr__, __dir__
