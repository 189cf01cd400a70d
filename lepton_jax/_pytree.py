"""Pytree key paths as '/'-joined strings, the one spelling used by
checkpoints, safetensors files and exported signatures."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def path_str(path: tuple[Any, ...]) -> str:
    """A ``jax.tree_util`` key path as ``"params/dense/kernel"``
    (``jax.tree_util.keystr`` with plain names and "/").

    Dict keys, attribute names and sequence indices all print as plain
    names, so a dataclass tree and the dict tree Orbax stores compare equal.
    """
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def named_shapes(tree: Any, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, tuple[int, ...]]:
    """``{path_str(path): shape}`` of every leaf of ``tree``: arrays, abstract
    ``jax.ShapeDtypeStruct`` leaves and anything else with a ``.shape``."""
    return {path_str(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}
