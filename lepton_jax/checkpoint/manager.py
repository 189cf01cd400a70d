"""Checkpoints on Orbax's CheckpointManager: the state's arrays plus JSON.

A checkpoint directory is a standard Orbax CheckpointManager directory. Each
step directory holds the Orbax items

- ``state``: any pytree of arrays (a ``TrainState``, a params dict, a flax
  variables dict), saved with ``PyTreeSave``;
- ``extra``: JSON from the caller (config, data position, versions);
- ``layout``: JSON written by this module: the mesh the arrays were saved
  from and, when given, the logical axis names of the parameters, so a
  restore onto another mesh can re-shard them by rules;
- ``metrics``: Orbax's own metrics item (used for best-by-metric retention).

so plain ``orbax.checkpoint.CheckpointManager(path).restore(step)`` reads it
without lepton_jax. Saves are asynchronous (Orbax writes in a background
thread) and atomic (Orbax writes to a temporary directory and renames it
when complete); retention is Orbax's preservation policies.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from lepton_jax._pytree import path_str as _path_str
from lepton_jax.checkpoint import paths

PyTree = Any
# Managers with a save that may still be in flight (strong references, so a
# manager dropped without wait() still finishes its write at exit).
_PENDING: set = set()


def _finish_pending_saves() -> None:
    """At interpreter exit, completes the asynchronous saves still in flight."""
    for manager in list(_PENDING):
        try:
            manager.wait()
        except Exception as error:  # noqa: BLE001 - report, never mask the exit
            warnings.warn(f"CheckpointManager: a save to {manager.directory} failed at exit: {error}", stacklevel=1)


# Orbax writes in worker threads whose executors shut down with the
# interpreter; threading's exit hooks run before that (last registered
# first), atexit's only after. Fall back to atexit where the hook is absent.
getattr(threading, "_register_atexit", atexit.register)(_finish_pending_saves)


class CheckpointManager:
    """Saves and restores training state in an Orbax checkpoint directory.

    Args:
      directory: where step directories are written (created if missing).
      max_to_keep: the most recent checkpoints to keep; with ``best_metric``,
        the ``max_to_keep`` best by that metric are kept, plus the latest
        (so a run can always resume).
      keep_every_n_steps: also keep every step that is a multiple of this.
      save_interval_steps: ``save`` writes only steps that are multiples of
        this (``force=True`` overrides).
      save_interval_seconds: and only when this many seconds have passed
        since the last save (wall-clock checkpointing; ``None``: no limit).
      best_metric: a key of the ``metrics`` passed to ``save`` that ranks
        checkpoints; ``best_mode`` is ``"min"`` or ``"max"``.
      async_save: write arrays in the background; ``wait()`` or ``close()``
        (also run at process exit by Orbax) finish the write.

    Use as a context manager, or call ``close()`` when done.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        keep_every_n_steps: int | None = None,
        save_interval_steps: int = 1,
        save_interval_seconds: float | None = None,
        best_metric: str | None = None,
        best_mode: str = "min",
        async_save: bool = True,
    ) -> None:
        if max_to_keep is None or max_to_keep < 1:
            raise ValueError(f"CheckpointManager: max_to_keep must be >= 1, got {max_to_keep}")
        if keep_every_n_steps is not None and keep_every_n_steps < 1:
            raise ValueError(f"CheckpointManager: keep_every_n_steps must be >= 1 or None, got {keep_every_n_steps}")
        if save_interval_steps < 1:
            raise ValueError(f"CheckpointManager: save_interval_steps must be >= 1, got {save_interval_steps}")
        if save_interval_seconds is not None and save_interval_seconds < 0:
            raise ValueError(f"CheckpointManager: save_interval_seconds must be >= 0, got {save_interval_seconds}")
        if best_mode not in ("min", "max"):
            raise ValueError(f"CheckpointManager: best_mode must be 'min' or 'max', got {best_mode!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_interval_steps = save_interval_steps
        self.save_interval_seconds = save_interval_seconds
        self.best_metric, self.best_mode = best_metric, best_mode
        self._last_save_time: float | None = None
        policy = ocp.checkpoint_managers
        if best_metric is None:
            keep: list = [policy.LatestN(n=max_to_keep)]
        else:
            worst = math.inf if best_mode == "min" else -math.inf
            keep = [policy.LatestN(n=1),
                    policy.BestN(get_metric_fn=lambda m: float(m.get(best_metric, worst)),
                                 reverse=best_mode == "min", n=max_to_keep)]
        if keep_every_n_steps is not None:
            keep.append(policy.EveryNSteps(interval_steps=keep_every_n_steps))
        # Save decisions (step and time intervals) are made in save(): Orbax's
        # default policy always saves the first step it sees. A best_fn is
        # always set so that Orbax writes the metrics item of every step.
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=policy.AnyPreservationPolicy(keep),
            best_fn=lambda m: 0.0 if best_metric is None else float(m.get(best_metric, 0.0)),
            best_mode=best_mode,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=paths.item_handlers())
        for name in paths.incomplete_steps(self.directory):
            warnings.warn(f"CheckpointManager: skipping incomplete checkpoint {os.path.join(self.directory, name)} "
                          "(a save that never finished)", stacklevel=2)

    # -- saving ---------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether ``save(step, ...)`` without ``force`` would write."""
        if step % self.save_interval_steps:
            return False
        if self.save_interval_seconds is not None and self._last_save_time is not None:
            return time.monotonic() - self._last_save_time >= self.save_interval_seconds
        return True

    def save(
        self,
        step: int,
        state: PyTree,
        *,
        metrics: Mapping[str, float] | None = None,
        extra: Mapping[str, Any] | None = None,
        force: bool = False,
        logical_axes: PyTree | None = None,
    ) -> bool:
        """Saves ``state`` (a pytree of arrays) at ``step``.

        Args:
          metrics: scalars stored with the step (``best_metric`` ranks by them).
          extra: JSON stored beside the arrays.
          force: save even off the step/time interval.
          logical_axes: the logical axis names of the parameters (a pytree
            mirroring ``state.params`` or ``state["params"]`` with tuple or
            ``PartitionSpec`` leaves, e.g. ``parallel.param_logical_axes``);
            lets ``restore(mesh=, rules=)`` re-shard without a target.

        Returns whether a checkpoint was written (``False`` when ``step`` is
        off the interval or already saved, unless ``force``).
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"CheckpointManager.save: step must be >= 0, got {step}")
        if step in self.all_steps() or (not force and not self.should_save(step)):
            return False
        if self.best_metric is not None and (metrics is None or self.best_metric not in metrics):
            warnings.warn(f"CheckpointManager.save: step {step} has no metric {self.best_metric!r}; it is kept only "
                          "while it is the latest", stacklevel=2)
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), extra=ocp.args.JsonSave(dict(extra or {})),
                                  layout=ocp.args.JsonSave(_layout(state, logical_axes)))
        saved = bool(self._manager.save(step, args=args, metrics=metrics, force=True))
        if saved:
            self._last_save_time = time.monotonic()
            _PENDING.add(self)
        return saved

    # -- restoring ------------------------------------------------------------

    def restore(
        self,
        step: int | None = None,
        *,
        target: PyTree | None = None,
        mesh: Mesh | None = None,
        rules: Any = None,
        params_only: bool = False,
        dtype: Any = None,
    ) -> PyTree:
        """Restores the state saved at ``step`` (default: the latest readable one).

        Args:
          target: a pytree with the saved structure (e.g. a fresh ``TrainState``
            or ``jax.eval_shape`` of one). The result has its tree type; leaves
            that carry a sharding are restored into it. A differing tree or
            shape raises ``ValueError`` naming the first differing path.
          mesh, rules: restore directly into this mesh; parameters (and the
            optimizer slots mirroring them) are sharded by ``rules`` from the
            logical axes saved with the checkpoint, everything else is
            replicated. Without ``mesh`` or a sharded ``target``, arrays land on
            the default device.
          params_only: read only the ``params`` subtree and return it (the
            optimizer state is not read from disk).
          dtype: cast floating arrays to this dtype as they are read.

        With ``step=None`` a latest step that cannot be read (corrupted) is
        skipped with a warning naming it and the previous one is restored.
        """
        if step is not None:
            return self._restore_step(self._resolve(step, "restore"), target, mesh, rules, params_only, dtype)
        steps = self._resolve_all("restore")
        for i, candidate in enumerate(reversed(steps)):
            try:
                return self._restore_step(candidate, target, mesh, rules, params_only, dtype)
            except (ValueError, TypeError):
                raise  # a target/argument mismatch is the caller's, not the checkpoint's
            except Exception as error:  # noqa: BLE001 - any read failure means a damaged step
                if i == len(steps) - 1:
                    raise CorruptCheckpointError(self._step_path(candidate), error) from error
                warnings.warn(f"CheckpointManager.restore: skipping unreadable checkpoint "
                              f"{self._step_path(candidate)} ({type(error).__name__}: {error})", stacklevel=2)
        raise AssertionError("unreachable")

    def _restore_step(self, step: int, target, mesh, rules, params_only: bool, dtype) -> PyTree:
        try:
            metadata_tree = _tree_of(self._manager.item_metadata(step)["state"])
            saved = _flatten(metadata_tree)
        except Exception as error:  # noqa: BLE001
            raise CorruptCheckpointError(self._step_path(step), error) from error
        if not saved:
            raise CorruptCheckpointError(self._step_path(step), RuntimeError("no array metadata"))
        if params_only:
            if not any(p.startswith("params/") for p in saved):
                raise ValueError(f"CheckpointManager.restore: params_only=True but the checkpoint at "
                                 f"{self._step_path(step)} has no 'params' subtree; paths are {sorted(saved)[:5]}...")
            saved = {p: v for p, v in saved.items() if p.startswith("params/")}
            if target is not None:
                target = _params_of(target)
                target = {"params": target}
        layout = self._layout(step)
        if target is not None:
            _check_target(saved, target, self._step_path(step))
            abstract = jax.tree_util.tree_map_with_path(
                lambda path, leaf: _abstract_leaf(_path_str(path), leaf.shape, leaf.dtype,
                                                  getattr(leaf, "sharding", None), mesh, rules, layout, dtype),
                target)
        else:
            if params_only:
                metadata_tree = {"params": metadata_tree["params"]}
            abstract = jax.tree_util.tree_map_with_path(
                lambda path, m: _abstract_leaf(_path_str(path), tuple(m.shape), m.dtype, None, mesh, rules, layout,
                                               dtype),
                metadata_tree, is_leaf=_is_array_metadata)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        item = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=params_only)
        restored = self._manager.restore(step, args=ocp.args.Composite(state=item))["state"]
        if params_only:
            restored = restored["params"]
        return restored

    def extra(self, step: int | None = None) -> dict[str, Any]:
        """The JSON ``extra`` saved with ``step`` (default: the latest)."""
        step = self._resolve(step, "extra")
        restored = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(restored["extra"] or {})

    def metrics(self, step: int | None = None) -> dict[str, float]:
        """The metrics saved with ``step`` (default: the latest); ``{}`` if none."""
        return dict(self._manager.metrics(self._resolve(step, "metrics")) or {})

    def _layout(self, step: int) -> dict[str, Any]:
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))
            return dict(restored["layout"] or {})
        except Exception:  # noqa: BLE001 - a checkpoint written by plain Orbax has no layout
            return {}

    # -- bookkeeping ----------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All complete steps, ascending."""
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished."""
        self._manager.wait_until_finished()
        _PENDING.discard(self)

    def close(self) -> None:
        """Finishes pending writes and releases resources."""
        self.wait()
        self._manager.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _resolve_all(self, where: str) -> list[int]:
        self.wait()
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"CheckpointManager.{where}: no checkpoint in {self.directory}")
        return steps

    def _resolve(self, step: int | None, where: str) -> int:
        return paths.resolve_step(self._resolve_all(where), step, self.directory, where=f"CheckpointManager.{where}")


class CorruptCheckpointError(RuntimeError):
    """A step directory exists but its arrays cannot be read."""

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(f"checkpoint {path} is corrupted or incomplete: {type(cause).__name__}: {cause}")
        self.path = path


def restore(directory: str | os.PathLike, step: int | None = None, *, target: PyTree | None = None,
            mesh: Mesh | None = None, rules: Any = None, params_only: bool = False, dtype: Any = None) -> PyTree:
    """One-line load: ``CheckpointManager(directory).restore(step, ...)``.

    ``directory`` is a checkpoint directory (the one holding step
    directories); a run's output directory with a ``checkpoints/`` inside
    also works.
    """
    directory = paths.checkpoint_dir(directory, where="checkpoint.restore")
    if not paths.has_steps(directory) and os.path.exists(os.path.join(directory, "_METADATA")):
        if step is not None:
            raise ValueError(f"checkpoint.restore: {directory} is a single pytree checkpoint (no steps); got step={step}")
        return _restore_single(directory, target, mesh, rules, params_only, dtype)
    manager = CheckpointManager(directory, async_save=False)
    try:
        return manager.restore(step, target=target, mesh=mesh, rules=rules, params_only=params_only, dtype=dtype)
    finally:
        manager.close()


def _restore_single(directory: str, target, mesh, rules, params_only: bool, dtype) -> PyTree:
    """A directory written by ``ocp.StandardCheckpointer``/``PyTreeCheckpointer``."""
    with ocp.PyTreeCheckpointer() as reader:
        metadata_tree = _tree_of(reader.metadata(directory))
        if params_only:
            if "params" not in metadata_tree:
                raise ValueError(f"checkpoint.restore: params_only=True but {directory} has no 'params' subtree")
            metadata_tree = {"params": metadata_tree["params"]}
            target = None if target is None else {"params": _params_of(target)}
        if target is not None:
            _check_target(_flatten(metadata_tree), target, directory)
            abstract = jax.tree_util.tree_map_with_path(
                lambda path, leaf: _abstract_leaf(_path_str(path), leaf.shape, leaf.dtype,
                                                  getattr(leaf, "sharding", None), mesh, rules, {}, dtype), target)
        else:
            abstract = jax.tree_util.tree_map_with_path(
                lambda path, m: _abstract_leaf(_path_str(path), tuple(m.shape), m.dtype, None, mesh, rules, {}, dtype),
                metadata_tree, is_leaf=_is_array_metadata)
        args = ocp.args.PyTreeRestore(abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                      partial_restore=params_only)
        restored = reader.restore(directory, args=args)
    return restored["params"] if params_only else restored


# -- helpers ------------------------------------------------------------------


def _layout(state: PyTree, logical_axes: PyTree | None) -> dict[str, Any]:
    meshes = {}
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            meshes = dict(zip(sharding.mesh.axis_names, (int(s) for s in sharding.mesh.devices.shape)))
            break
    layout: dict[str, Any] = {"mesh": meshes, "num_devices": jax.device_count(), "process_count": jax.process_count()}
    if logical_axes is not None:
        is_axes = lambda x: isinstance(x, (tuple, PartitionSpec)) and all(  # noqa: E731
            n is None or isinstance(n, str) for n in x)
        flat = jax.tree_util.tree_leaves_with_path(logical_axes, is_leaf=is_axes)
        layout["logical_axes"] = {_path_str(p): list(names) for p, names in flat}
    return layout


def _params_of(target: PyTree) -> PyTree:
    if isinstance(target, Mapping) and "params" in target:
        return target["params"]
    if hasattr(target, "params"):
        return target.params
    return target


def _abstract_leaf(path: str, shape, dtype, sharding, mesh, rules, layout, cast) -> jax.ShapeDtypeStruct:
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if cast is not None and jnp.issubdtype(dtype, jnp.floating):
        dtype = np.dtype(cast)
    if mesh is not None:
        sharding = _mesh_sharding(path, shape, mesh, rules, layout)
    elif not isinstance(sharding, jax.sharding.Sharding):
        sharding = SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _mesh_sharding(path: str, shape: tuple[int, ...], mesh: Mesh, rules, layout) -> NamedSharding:
    names = _logical_names(path, len(shape), layout.get("logical_axes") or {})
    if names is None or rules is None:
        return NamedSharding(mesh, PartitionSpec())
    from lepton_jax.parallel import rules as rules_lib  # lazy: parallel imports train, which imports us

    sharding = rules_lib.logical_sharding(names, mesh, rules)
    for dim, axes in zip(shape, sharding.spec):
        if axes is None:
            continue
        size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))
        if dim % size:
            raise ValueError(f"CheckpointManager.restore: {path!r} has shape {shape}; its axis {names} -> {axes} "
                             f"is split {size} ways on this mesh, which does not divide {dim}")
    return sharding


def _logical_names(path: str, ndim: int, logical_axes: Mapping[str, Sequence[str | None]]):
    """The parameter's logical names for ``params/<p>`` and for optimizer
    slots whose path ends with ``<p>`` (Adam's ``mu``/``nu`` mirror params)."""
    for suffix in _suffixes(path):
        names = logical_axes.get(suffix)
        if names is not None and len(names) == ndim:
            return tuple(names)
    return None


def _suffixes(path: str):
    parts = path.split("/")
    for i in range(len(parts)):
        yield "/".join(parts[i:])


def _is_array_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _tree_of(metadata: PyTree) -> PyTree:
    if hasattr(metadata, "item_metadata"):  # a StepMetadata around the tree
        metadata = metadata.item_metadata
    return getattr(metadata, "tree", metadata)


def _flatten(tree: PyTree) -> dict[str, Any]:
    flat = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_array_metadata)
    return {_path_str(p): v for p, v in flat if _is_array_metadata(v)}


def _check_target(saved: Mapping[str, Any], target: PyTree, where: str) -> None:
    """Raises ValueError naming the first path where ``target`` and the
    checkpoint differ (a path in only one of them, or a shape)."""
    wanted = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    for path in sorted(set(wanted) | set(saved)):
        if path not in saved:
            raise ValueError(f"CheckpointManager.restore: target has {path!r} (shape {tuple(np.shape(wanted[path]))}) "
                             f"but the checkpoint {where} does not")
        if path not in wanted:
            raise ValueError(f"CheckpointManager.restore: the checkpoint {where} has {path!r} "
                             f"(shape {tuple(saved[path].shape)}) but the target does not")
        target_shape, saved_shape = tuple(np.shape(wanted[path])), tuple(saved[path].shape)
        if target_shape != saved_shape:
            raise ValueError(f"CheckpointManager.restore: target leaf {path!r} has shape {target_shape} "
                             f"but the checkpoint has {saved_shape}")
