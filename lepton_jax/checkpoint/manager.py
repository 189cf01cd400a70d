"""Checkpoints on Orbax's CheckpointManager: the state's arrays plus JSON extras.

Each step directory holds two Orbax items: ``state`` (any pytree of arrays,
saved with ``StandardSave``, readable by plain Orbax) and ``extra`` (JSON:
data-iterator position, config, versions).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

PyTree = Any


class CheckpointManager:
    """Saves and restores training state; keeps the last ``max_to_keep`` steps.

    Args:
      directory: where step directories are written (created if missing).
      max_to_keep: how many of the most recent checkpoints to keep.
      save_interval_steps: ``save`` writes only on steps that are multiples
        of this (``force=True`` overrides).
      async_save: write arrays in the background; ``wait()`` or ``close()``
        finish the write.

    Use as a context manager, or call ``close()`` when done.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ) -> None:
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"CheckpointManager: max_to_keep must be >= 1, got {max_to_keep}")
        if save_interval_steps < 1:
            raise ValueError(
                f"CheckpointManager: save_interval_steps must be >= 1, got {save_interval_steps}"
            )
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_interval_steps = save_interval_steps
        # The interval is applied in save(): Orbax's own policy always saves
        # the first step it sees, whatever the interval.
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "extra")
        )

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves ``state`` (a pytree of arrays) and ``extra`` (JSON) at ``step``.

        Returns whether a checkpoint was written (``False`` when ``step`` is not
        on the save interval or already saved, unless ``force``).
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"CheckpointManager.save: step must be >= 0, got {step}")
        if step in self.all_steps() or (not force and step % self.save_interval_steps):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(dict(extra or {}))
        )
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, step: int | None = None, *, target: PyTree | None = None) -> PyTree:
        """Restores the state saved at ``step`` (default: the latest).

        With ``target`` (a pytree with the saved structure, e.g. a freshly
        initialised ``TrainState``), the result has ``target``'s tree type,
        shapes and dtypes; a differing shape raises ``ValueError``. Without it,
        the result is the nested dict/list tree Orbax stored.
        """
        step = self._resolve(step, "restore")
        if target is not None:
            _check_target(self._manager.item_metadata(step)["state"], target)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
            item = ocp.args.StandardRestore(abstract)
        else:
            item = ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(state=item))
        return restored["state"]

    def extra(self, step: int | None = None) -> dict[str, Any]:
        """The JSON ``extra`` saved with ``step`` (default: the latest)."""
        step = self._resolve(step, "extra")
        restored = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(restored["extra"] or {})

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All complete steps, ascending."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending writes and releases resources."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _resolve(self, step: int | None, where: str) -> int:
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"CheckpointManager.{where}: no checkpoint in {self.directory}")
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"CheckpointManager.{where}: no step {step} in {self.directory}; steps are {steps}"
            )
        return int(step)


def _check_target(saved_metadata: PyTree, target: PyTree) -> None:
    """Raises ValueError naming the first leaf whose shape differs."""
    saved = {_path_str(p): v for p, v in _leaves_with_path(saved_metadata)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(target):
        key = _path_str(path)
        if key not in saved:
            continue  # structural mismatch is reported by Orbax with its own message
        saved_shape = tuple(getattr(saved[key], "shape", ()) or ())
        target_shape = tuple(getattr(leaf, "shape", ()))
        if saved_shape != target_shape:
            raise ValueError(
                f"CheckpointManager.restore: target leaf {key!r} has shape {target_shape} "
                f"but the checkpoint has {saved_shape}"
            )


def _leaves_with_path(tree: PyTree):
    return jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    )


def _path_str(path) -> str:
    # Attribute, dict-key and sequence-index entries all print as plain names,
    # so a dataclass target and the dict tree Orbax stored compare equal.
    parts = []
    for entry in path:
        for attr in ("name", "key", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)
