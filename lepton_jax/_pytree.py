"""Pytree key paths as '/'-joined strings, the one spelling used by
checkpoints, safetensors files and exported signatures."""

from __future__ import annotations

from typing import Any

import jax


def path_str(path: tuple[Any, ...]) -> str:
    """A ``jax.tree_util`` key path as ``"params/dense/kernel"``
    (``jax.tree_util.keystr`` with plain names and "/").

    Dict keys, attribute names and sequence indices all print as plain
    names, so a dataclass tree and the dict tree Orbax stores compare equal.
    """
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")
