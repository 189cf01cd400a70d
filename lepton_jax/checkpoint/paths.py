"""Where checkpoints live: the one place for the directory rules.

A checkpoint directory holds one directory per step (``0``, ``100``, ...),
each an Orbax ``CheckpointManager`` step with the items below. A run's
output directory holds its checkpoint directory as ``checkpoints/``;
everything that takes a checkpoint path accepts either.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import orbax.checkpoint as ocp

# Run output directories keep their checkpoints here.
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^\d+$")
_TMP_DIR = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def is_step_dir(name: str) -> bool:
    """Whether ``name`` (a directory's base name) is a complete step: digits only."""
    return bool(_STEP_DIR.match(name))


def has_steps(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` exists and holds at least one step directory."""
    directory = os.fspath(directory)
    return os.path.isdir(directory) and any(is_step_dir(name) for name in os.listdir(directory))


def incomplete_steps(directory: str | os.PathLike) -> list[str]:
    """The temporary directories of saves that never finished, sorted."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(name for name in os.listdir(directory) if _TMP_DIR.match(name))


def _prefixed(where: str | None, message: str) -> str:
    return message if where is None else f"{where}: {message}"


def checkpoint_dir(path: str | os.PathLike, *, where: str | None = None) -> str:
    """The absolute checkpoint directory of ``path``: ``path`` itself, or its
    ``checkpoints/`` when ``path`` is a run's output directory without steps
    of its own. Raises ``FileNotFoundError`` (prefixed with ``where``) when
    ``path`` is not a directory."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(_prefixed(where, f"no such directory {path}" if not os.path.exists(path)
                                          else f"{path} is not a directory"))
    nested = os.path.join(path, CHECKPOINTS)
    if not has_steps(path) and os.path.isdir(nested):
        return nested
    return path


def resolve_step(steps: Sequence[int], step: int | None, directory: str, *, where: str | None = None) -> int:
    """``step``, or the latest of ``steps`` when ``None``; a ``FileNotFoundError``
    (prefixed with ``where``) naming the directory and its steps when absent."""
    steps = sorted(int(s) for s in steps)
    if not steps:
        raise FileNotFoundError(_prefixed(where, f"no checkpoint in {directory}"))
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise FileNotFoundError(_prefixed(where, f"no step {step} in {directory}; steps are {steps}"))
    return int(step)


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """The Orbax handlers of a step's items: ``state`` (a pytree of arrays),
    ``extra`` and ``layout`` (JSON). Orbax's own ``metrics`` item needs none."""
    return {"state": ocp.PyTreeCheckpointHandler(), "extra": ocp.JsonCheckpointHandler(),
            "layout": ocp.JsonCheckpointHandler()}


__all__ = ["CHECKPOINTS", "checkpoint_dir", "has_steps", "incomplete_steps", "is_step_dir", "item_handlers",
           "resolve_step"]
