"""Pytrees of arrays to and from ``.safetensors`` files.

A safetensors file is a flat ``{name: array}`` map; a pytree is stored with
its leaves named by their '/'-joined paths (``"block_0/attention/query"``)
and read back as nested dicts of numpy arrays.

bfloat16 is stored as the format's ``BF16`` and read back as
``ml_dtypes.bfloat16``, bit for bit: ``safetensors>=0.8``'s numpy API handles
the ml_dtypes types (older releases fail on them, hence the version floor).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from lepton_jax._pytree import path_str  # re-exported: this module's names are these paths

PyTree = Any
SEPARATOR = "/"


def flatten(tree: PyTree, is_leaf: Any = None) -> dict[str, Any]:
    """The leaves of ``tree`` keyed by their '/'-joined paths, in tree order."""
    flat: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf):
        name = path_str(path)
        if any(SEPARATOR in str(getattr(k, "key", "")) for k in path):
            raise ValueError(f"flatten: the key path {jax.tree_util.keystr(path)} has a key containing "
                             f"{SEPARATOR!r}, which would make the name {name!r} ambiguous")
        flat[name] = leaf
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from '/'-joined names (the inverse of ``flatten`` for trees
    of dicts; list indices come back as string keys)."""
    names = set(flat)
    for name in flat:
        parts = name.split(SEPARATOR)
        for i in range(1, len(parts)):
            if (prefix := SEPARATOR.join(parts[:i])) in names:
                raise ValueError(f"unflatten: {name!r} lies under {prefix!r}, which is itself an array")
    return traverse_util.unflatten_dict(dict(flat), sep=SEPARATOR)


def save_safetensors(tree: PyTree, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Writes the arrays of ``tree`` to ``path`` under their '/'-joined paths.

    ``metadata`` is stored in the header; its values are converted to strings
    (the format holds ``str -> str`` only).
    """
    arrays = {name: np.ascontiguousarray(np.asarray(leaf)).reshape(np.shape(leaf))
              for name, leaf in flatten(tree).items()}
    if not arrays:
        raise ValueError(f"save_safetensors: the tree written to {os.fspath(path)!r} has no arrays")
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    save_file(arrays, os.fspath(path), metadata=header)


def load_safetensors(path: str | os.PathLike) -> dict[str, Any]:
    """The arrays of a safetensors file as nested dicts of numpy arrays."""
    with safe_open(os.fspath(path), framework="np") as file:
        return unflatten({name: file.get_tensor(name) for name in file.keys()})


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` header of a safetensors file (``{}`` when absent)."""
    with safe_open(os.fspath(path), framework="np") as file:
        return dict(file.metadata() or {})
