"""Pytree key paths as '/'-joined strings, the one spelling used by
checkpoints, safetensors files and exported signatures."""

from __future__ import annotations

from typing import Any


def path_str(path: tuple[Any, ...]) -> str:
    """A ``jax.tree_util`` key path as ``"params/dense/kernel"``.

    Dict keys, attribute names and sequence indices all print as plain
    names, so a dataclass tree and the dict tree Orbax stores compare equal.
    """
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/FlattenedIndexKey
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)
