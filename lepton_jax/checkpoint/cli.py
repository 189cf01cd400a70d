"""``lepton-jax ckpt``: list, inspect, diff, convert and verify checkpoints.

    lepton-jax ckpt ls DIR                          # steps, times, sizes on disk, metrics
    lepton-jax ckpt inspect DIR [--step N]          # every array: path, shape, dtype, bytes
    lepton-jax ckpt diff A B [--step-a N] [--step-b M]
    lepton-jax ckpt convert SRC DST [--step N] [--params-only] [--dtype bfloat16]
                                    [--format orbax|safetensors]
    lepton-jax ckpt verify DIR [--step N]           # read everything, check it is finite

Every verb prints a table, or JSON with ``--json``. Exit status: 0 on success;
1 when ``diff`` finds a difference (paths, shapes, dtypes or values) or
``verify`` a bad step; 2 on an error (no such directory or step, not a
checkpoint directory, a bad argument), reported as one line on stderr.

DIR is an Orbax CheckpointManager directory as ``CheckpointManager`` writes
it (``DIR/<step>/state``, ``DIR/<step>/extra``; a run directory holding
``checkpoints/`` works too), read with plain Orbax: these commands work on
checkpoints from any code that saves the ``state`` item as a pytree.

``convert`` writes a new checkpoint directory at the same step (``state``,
and ``extra`` copied), or with ``--format safetensors`` the parameters (the
``params`` subtree when there is one, else every array) as one file: DST
itself when it ends in ``.safetensors``, else ``DST/model.safetensors``.
A ``.safetensors`` SRC is imported as a checkpoint at step ``--step``
(default 0), its arrays under ``params`` unless the file was exported from
a checkpoint without a ``params`` subtree.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import math
import os
import sys
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lepton_jax.checkpoint import paths
from lepton_jax.checkpoint.safetensors_io import flatten, load_safetensors, path_str, save_safetensors, safetensors_metadata

PyTree = Any
ArraySpec = tuple[tuple[int, ...], np.dtype]
SAFETENSORS_FILE = "model.safetensors"


class CheckpointCommandError(Exception):
    """A user error (bad path, step or argument): the command line prints it as
    one line and exits with status 2."""


# -- reading ------------------------------------------------------------------


@contextlib.contextmanager
def _open(directory: str | os.PathLike) -> Iterator[tuple[ocp.CheckpointManager, str]]:
    try:
        path = paths.checkpoint_dir(directory)
    except FileNotFoundError as error:
        raise CheckpointCommandError(str(error)) from None
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    manager = ocp.CheckpointManager(path, item_handlers=paths.item_handlers(), options=options)
    try:
        if not manager.all_steps():
            raise CheckpointCommandError(f"{path} is not a checkpoint directory (it has no step directories)")
        yield manager, path
    finally:
        manager.close()


def _resolve(manager: ocp.CheckpointManager, path: str, step: int | None) -> int:
    try:
        return paths.resolve_step(manager.all_steps(), step, path)
    except FileNotFoundError as error:
        raise CheckpointCommandError(str(error)) from None


def _is_array_metadata(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _metadata_tree(manager: ocp.CheckpointManager, path: str, step: int) -> PyTree:
    """The ``state`` item's tree with an ``ArrayMetadata`` per array (no reads)."""
    try:
        metadata = manager.item_metadata(step)["state"]
    except Exception as error:  # noqa: BLE001 - Orbax raises KeyError, OSError, ... for a missing item
        raise CheckpointCommandError(f"step {step} in {path} has no readable 'state' item ({_short(error)})") from error
    tree = getattr(metadata, "tree", metadata)
    if not jax.tree.leaves(tree, is_leaf=_is_array_metadata):
        raise CheckpointCommandError(f"step {step} in {path} has no array metadata (state/_METADATA missing or empty)")
    return tree


def _array_specs(tree: PyTree) -> dict[str, ArraySpec]:
    return {name: (tuple(int(d) for d in m.shape), np.dtype(m.dtype))
            for name, m in flatten(tree, is_leaf=_is_array_metadata).items() if _is_array_metadata(m)}


def _restore(manager: ocp.CheckpointManager, step: int, tree: PyTree, wanted: set[str] | None = None) -> PyTree:
    """Reads the arrays of ``tree`` (metadata), or only the ``wanted`` paths
    (the others come back as ``ocp.PLACEHOLDER``)."""

    def target(path, m):
        if _is_array_metadata(m) and (wanted is None or path_str(path) in wanted):
            return jax.ShapeDtypeStruct(m.shape, m.dtype)
        return ocp.PLACEHOLDER

    item = jax.tree_util.tree_map_with_path(target, tree, is_leaf=_is_array_metadata)
    # Numpy arrays, not jax arrays: the commands compute on the host, and an
    # accelerator's memory would only limit the checkpoints they can read.
    restore_args = jax.tree.map(
        lambda x: ocp.RestoreArgs(restore_type=np.ndarray) if x is not ocp.PLACEHOLDER else x, item)
    args = ocp.args.Composite(state=ocp.args.PyTreeRestore(item, restore_args=restore_args))
    return manager.restore(step, args=args)["state"]


def _read(manager: ocp.CheckpointManager, path: str, step: int, tree: PyTree,
          wanted: set[str] | None = None) -> PyTree:
    """``_restore``, with a failure reported as the arrays that cannot be read."""
    try:
        return _restore(manager, step, tree, wanted)
    except Exception as error:  # noqa: BLE001 - any read failure means damaged data
        raise CheckpointCommandError(f"cannot read step {step} in {path}: "
                                     f"{_unreadable(manager, step, tree, wanted)}") from error


def _read_flat(manager: ocp.CheckpointManager, path: str, step: int, tree: PyTree) -> dict[str, np.ndarray]:
    return {name: x for name, x in flatten(_read(manager, path, step, tree)).items() if x is not ocp.PLACEHOLDER}


def _unreadable(manager: ocp.CheckpointManager, step: int, tree: PyTree, wanted: set[str] | None) -> str:
    """Which arrays fail to read, one read each (only run after a failed read)."""
    failures = []
    for name in sorted(wanted if wanted is not None else _array_specs(tree)):
        try:
            _restore(manager, step, tree, {name})
        except Exception as error:  # noqa: BLE001
            failures.append(f"{name} ({_short(error)})")
    if not failures:
        return "the arrays read one by one, but not together"
    more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
    return f"{len(failures)} unreadable array(s): " + "; ".join(failures[:3]) + more


def _short(error: BaseException) -> str:
    """The root cause's first line, without TensorStore's spec dump."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
    return text if len(text) <= 240 else text[:237] + "..."


def _item(manager: ocp.CheckpointManager, step: int, name: str) -> dict[str, Any] | None:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
    except Exception:  # noqa: BLE001 - a checkpoint need not have every JSON item
        return None
    return dict(restored[name] or {})


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Orbax logs a warning for every read-only manager, and a failed
    TensorStore read leaves coroutines that report through
    ``sys.unraisablehook``; the commands report failures themselves."""
    logger, hook = logging.getLogger("absl"), sys.unraisablehook
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda _: None
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = hook
        logger.setLevel(level)


# -- the verbs ----------------------------------------------------------------


def list_steps(directory: str | os.PathLike) -> dict[str, Any]:
    """Every step of a checkpoint directory: its time, size on disk and metrics."""
    with _open(directory) as (manager, path):
        steps = []
        for step in sorted(manager.all_steps()):
            step_dir = os.path.join(path, str(step))
            try:
                timestamp = manager.metadata(step).commit_timestamp_nsecs / 1e9
            except Exception:  # noqa: BLE001 - no or damaged Orbax metadata: the directory's time
                timestamp = None
            timestamp = timestamp or os.path.getmtime(step_dir)
            size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(step_dir) for f in files)
            try:
                metrics = dict(manager.metrics(step) or {})
            except Exception:  # noqa: BLE001 - unreadable metrics are shown as none
                metrics = {}
            steps.append({"step": step, "time": _iso(timestamp), "timestamp": timestamp, "bytes": size,
                          "metrics": metrics})
    return {"directory": path, "steps": steps}


def inspect_step(directory: str | os.PathLike, step: int | None = None, *, sparsity: bool = False) -> dict[str, Any]:
    """Every array of a step (default: the latest) from metadata, without reading data.

    ``total_params`` counts the elements under the ``params`` subtree, or of
    every array when there is none. With ``sparsity`` the arrays are read and
    each gets ``"sparsity"``: its fraction of exact zeros (pruned weights).
    """
    with _open(directory) as (manager, path):
        step = _resolve(manager, path, step)
        tree = _metadata_tree(manager, path, step)
        specs = _array_specs(tree)
        values = _read_flat(manager, path, step, tree) if sparsity else {}
    arrays = [{"path": name, "shape": list(shape), "dtype": dtype.name, "bytes": math.prod(shape) * dtype.itemsize}
              for name, (shape, dtype) in specs.items()]
    for entry in arrays:
        if entry["path"] in values:
            value = np.asarray(values[entry["path"]])
            entry["sparsity"] = float(np.mean(value == 0)) if value.size else 0.0
    params = [a for a in arrays if _in_params(a["path"])] or arrays
    return {"directory": path, "step": step, "arrays": arrays, "total_bytes": sum(a["bytes"] for a in arrays),
            "total_params": sum(math.prod(a["shape"]) for a in params)}


def diff_checkpoints(a: str | os.PathLike, b: str | os.PathLike, step_a: int | None = None,
                     step_b: int | None = None) -> dict[str, Any]:
    """Compares the arrays of two checkpoints (default: the latest step of each).

    Returns the paths only in one, and per common path both shapes and dtypes
    and ``max_abs_diff`` (``None`` when the shapes differ); ``identical`` is
    true when paths, shapes, dtypes and values all agree (NaN equals NaN).
    """
    sides = []
    for directory, step in ((a, step_a), (b, step_b)):
        with _open(directory) as (manager, path):
            step = _resolve(manager, path, step)
            tree = _metadata_tree(manager, path, step)
            sides.append((path, step, _read_flat(manager, path, step, tree)))
    (path_a, step_a, arrays_a), (path_b, step_b, arrays_b) = sides
    compared = []
    for name in [n for n in arrays_a if n in arrays_b]:
        x, y = arrays_a[name], arrays_b[name]
        same_shape = x.shape == y.shape
        difference = _max_abs_diff(x, y) if same_shape else None
        compared.append({"path": name, "shape_a": list(x.shape), "shape_b": list(y.shape), "dtype_a": x.dtype.name,
                         "dtype_b": y.dtype.name, "max_abs_diff": difference,
                         "equal": same_shape and x.dtype == y.dtype and difference == 0.0})
    only_a = [n for n in arrays_a if n not in arrays_b]
    only_b = [n for n in arrays_b if n not in arrays_a]
    return {"a": {"directory": path_a, "step": step_a}, "b": {"directory": path_b, "step": step_b},
            "identical": not only_a and not only_b and all(c["equal"] for c in compared),
            "only_in_a": only_a, "only_in_b": only_b, "arrays": compared}


def _max_abs_diff(x: np.ndarray, y: np.ndarray) -> float:
    """max |x - y| in float64 (exact for every float of <= 32 bits); NaN against
    NaN counts as equal, NaN against a number as an infinite difference."""
    wide = np.complex128 if np.iscomplexobj(x) or np.iscomplexobj(y) else np.float64
    x, y = np.asarray(x).astype(wide), np.asarray(y).astype(wide)
    if x.size == 0:
        return 0.0
    difference = np.where(x == y, 0.0, np.abs(x - y))  # x == y also covers inf == inf
    difference = np.where(np.isnan(x) & np.isnan(y), 0.0, difference)
    return float(np.nan_to_num(difference, nan=np.inf).max())


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, step: int | None = None,
                       params_only: bool = False, dtype: str | None = None, format: str = "orbax") -> dict[str, Any]:
    """Writes SRC (a checkpoint directory or a ``.safetensors`` file) to DST.

    Args:
      step: the step read from a checkpoint SRC (default: the latest); for a
        safetensors SRC, the step of the checkpoint written (default 0).
      params_only: keep only the ``params`` subtree.
      dtype: cast floating arrays to this dtype (e.g. ``"bfloat16"``).
      format: ``"orbax"`` (a new checkpoint directory DST at the same step) or
        ``"safetensors"`` (the parameters as one file, see the module doc).

    Returns what was written: ``destination``, ``format``, ``step``, ``arrays``, ``total_bytes``.
    """
    if format not in ("orbax", "safetensors"):
        raise CheckpointCommandError(f"--format must be 'orbax' or 'safetensors', got {format!r}")
    cast = _floating_dtype(dtype) if dtype is not None else None
    source = os.path.abspath(os.fspath(src))
    if os.path.isfile(source):
        tree, step, extra, layout = _import_safetensors(source, step)
    else:
        with _open(source) as (manager, path):
            step = _resolve(manager, path, step)
            metadata = _metadata_tree(manager, path, step)
            wanted = None
            if params_only:
                wanted = {n for n in _array_specs(metadata) if _in_params(n)}
                if not wanted:
                    raise CheckpointCommandError(f"--params-only: step {step} in {path} has no 'params' subtree")
            tree = _read(manager, path, step, metadata, wanted)
            extra, layout = _item(manager, step, "extra") or {}, _item(manager, step, "layout")
    if params_only:
        if not isinstance(tree, Mapping) or "params" not in tree:
            raise CheckpointCommandError(f"--params-only: {source} has no 'params' subtree")
        tree = {"params": tree["params"]}
    if cast is not None:
        tree = jax.tree.map(lambda x: x.astype(cast) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    if format == "safetensors":
        subtree = "params" if isinstance(tree, Mapping) and "params" in tree else ""
        tree = tree[subtree] if subtree else tree
        destination = _write_safetensors(tree, dst, step, cast.name if cast is not None else None, subtree)
    else:
        destination = _write_orbax(tree, dst, step, extra, layout)
    leaves = jax.tree.leaves(tree)
    return {"source": source, "destination": destination, "format": format, "step": step,
            "arrays": len(leaves), "total_bytes": sum(int(x.nbytes) for x in leaves)}


def _import_safetensors(source: str, step: int | None) -> tuple[PyTree, int, dict[str, Any], None]:
    if step is not None and step < 0:
        raise CheckpointCommandError(f"--step must be >= 0 to import {source}, got {step}")
    try:
        arrays, metadata = load_safetensors(source), safetensors_metadata(source)
    except Exception as error:  # noqa: BLE001 - the library raises its own error types
        raise CheckpointCommandError(f"{source} is not a readable safetensors file ({_short(error)})") from error
    if metadata.get("subtree", "params") == "params":
        arrays = {"params": arrays}
    extra = {"converted_from": source, "safetensors_metadata": metadata}
    return arrays, 0 if step is None else step, extra, None


def _write_orbax(tree: PyTree, dst: str | os.PathLike, step: int, extra: dict[str, Any],
                 layout: dict[str, Any] | None) -> str:
    destination = os.path.abspath(os.fspath(dst))
    if os.path.exists(destination) and (not os.path.isdir(destination) or os.listdir(destination)):
        raise CheckpointCommandError(f"{destination} already exists; convert writes a new checkpoint directory")
    items = {"state": ocp.args.StandardSave(tree), "extra": ocp.args.JsonSave(extra)}
    if layout is not None:
        items["layout"] = ocp.args.JsonSave(layout)
    manager = ocp.CheckpointManager(destination, item_names=tuple(items))
    try:
        manager.save(step, args=ocp.args.Composite(**items))
        manager.wait_until_finished()
    finally:
        manager.close()
    return destination


def _write_safetensors(tree: PyTree, dst: str | os.PathLike, step: int, dtype: str | None, subtree: str) -> str:
    """``subtree`` ("params" or "") is recorded so that an import puts the arrays back where they were."""
    destination = os.path.abspath(os.fspath(dst))
    if not destination.endswith(".safetensors"):
        destination = os.path.join(destination, SAFETENSORS_FILE)
    if os.path.exists(destination):
        raise CheckpointCommandError(f"{destination} already exists")
    dtypes = sorted({x.dtype.name for x in jax.tree.leaves(tree)})
    metadata = {"format": "lepton_jax", "step": step, "subtree": subtree,
                "dtype": dtype or (dtypes[0] if len(dtypes) == 1 else "mixed")}
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    save_safetensors(tree, destination, metadata)
    return destination


def verify_checkpoint(directory: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Reads every array of ``step`` (default: every step) and checks that all
    arrays named by the metadata are there with their shape and dtype, and
    that floating values are finite. ``ok`` is true when every step passes."""
    with _open(directory) as (manager, path):
        steps = sorted(manager.all_steps()) if step is None else [_resolve(manager, path, step)]
        results = [_verify_step(manager, path, s) for s in steps]
    return {"directory": path, "ok": all(r["ok"] for r in results), "steps": results}


def _verify_step(manager: ocp.CheckpointManager, path: str, step: int) -> dict[str, Any]:
    try:
        tree = _metadata_tree(manager, path, step)
        specs = _array_specs(tree)
        arrays = _read_flat(manager, path, step, tree)
    except CheckpointCommandError as error:
        return {"step": step, "ok": False, "arrays": 0, "reasons": [str(error)]}
    reasons = [f"{name} is missing" for name in specs if name not in arrays]
    for name, x in arrays.items():
        if name not in specs:
            continue
        shape, dtype = specs[name]
        if x.shape != shape or x.dtype != dtype:
            reasons.append(f"{name} reads as {x.dtype.name}{list(x.shape)}, metadata says {dtype.name}{list(shape)}")
        elif jnp.issubdtype(x.dtype, jnp.inexact) and (bad := int(x.size - np.count_nonzero(np.isfinite(x)))):
            reasons.append(f"{name} has {bad} non-finite value(s)")
    return {"step": step, "ok": not reasons, "arrays": len(arrays), "reasons": reasons}


# -- helpers ------------------------------------------------------------------


def _in_params(name: str) -> bool:
    return name == "params" or name.startswith("params/")


def _floating_dtype(name: str) -> np.dtype:
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise CheckpointCommandError(f"--dtype must be a floating dtype such as bfloat16, float16 or float32; "
                                     f"got {name!r}")
    return np.dtype(dtype)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).astimezone().isoformat(timespec="seconds")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _json_safe(value: Any) -> Any:
    """Strict JSON: non-finite floats become the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _format_metrics(metrics: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()) or "-"


# -- the command line ---------------------------------------------------------


def _print_human(verb: str, result: dict[str, Any]) -> None:
    if verb == "ls":
        print(result["directory"])
        print(_table(("step", "time", "size", "metrics"),
                     [(s["step"], s["time"].replace("T", " ")[:19], _human_bytes(s["bytes"]),
                       _format_metrics(s["metrics"])) for s in result["steps"]]))
    elif verb == "inspect":
        print(f"step {result['step']} of {result['directory']}")
        if any("sparsity" in a for a in result["arrays"]):
            print(_table(("path", "shape", "dtype", "bytes", "sparsity"),
                         [(a["path"], tuple(a["shape"]), a["dtype"], a["bytes"], f"{a.get('sparsity', 0.0):.1%}")
                          for a in result["arrays"]]))
        else:
            print(_table(("path", "shape", "dtype", "bytes"),
                         [(a["path"], tuple(a["shape"]), a["dtype"], a["bytes"]) for a in result["arrays"]]))
        total = result["total_bytes"]
        exact = f" ({total:,} bytes)" if total >= 1024 else ""
        print(f"{len(result['arrays'])} arrays, {_human_bytes(total)}{exact}, {result['total_params']:,} params")
    elif verb == "diff":
        print(f"A: {result['a']['directory']} step {result['a']['step']}")
        print(f"B: {result['b']['directory']} step {result['b']['step']}")
        lines = [f"only in A: {n}" for n in result["only_in_a"]] + [f"only in B: {n}" for n in result["only_in_b"]]
        for c in result["arrays"]:
            if c["shape_a"] != c["shape_b"]:
                lines.append(f"shape differs: {c['path']}: {tuple(c['shape_a'])} vs {tuple(c['shape_b'])}")
                continue
            if c["dtype_a"] != c["dtype_b"]:
                lines.append(f"dtype differs: {c['path']}: {c['dtype_a']} vs {c['dtype_b']}")
            if c["max_abs_diff"]:
                lines.append(f"values differ: {c['path']}: max |a - b| = {c['max_abs_diff']:.6g}")
        if lines:
            print("\n".join(lines))
        verdict = "identical" if result["identical"] else "differ"
        print(f"{len(result['arrays'])} common arrays; checkpoints {verdict}")
    elif verb == "convert":
        print(f"wrote {result['destination']} ({result['format']}, step {result['step']}, {result['arrays']} arrays, "
              f"{_human_bytes(result['total_bytes'])})")
    elif verb == "verify":
        for s in result["steps"]:
            status = "OK" if s["ok"] else "FAIL"
            print(f"step {s['step']}: {status} ({s['arrays']} arrays)" + "".join(f"\n  {r}" for r in s["reasons"]))


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser = argparse.ArgumentParser(prog="lepton-jax ckpt", description="inspect and convert checkpoints",
                                     epilog="exit status: 0 ok; 1 diff found differences or verify failed; 2 error")
    verbs = parser.add_subparsers(dest="verb", required=True)
    ls = verbs.add_parser("ls", parents=[common], help="steps with their time, size on disk and metrics")
    ls.add_argument("directory")
    inspect = verbs.add_parser("inspect", parents=[common], help="every array's path, shape, dtype and bytes")
    inspect.add_argument("directory")
    inspect.add_argument("--step", type=int, help="default: the latest")
    inspect.add_argument("--sparsity", action="store_true", help="read the arrays and report each one's zeros")
    diff = verbs.add_parser("diff", parents=[common], help="compare two checkpoints; exit 1 when they differ")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--step-a", type=int, help="default: the latest")
    diff.add_argument("--step-b", type=int, help="default: the latest")
    convert = verbs.add_parser("convert", parents=[common], help="write a checkpoint as orbax or safetensors")
    convert.add_argument("src", help="a checkpoint directory or a .safetensors file")
    convert.add_argument("dst", help="a new directory, or a .safetensors file (else DST/model.safetensors)")
    convert.add_argument("--step", type=int, help="the step read (default: the latest); for a .safetensors SRC, "
                                                  "the step written (default 0)")
    convert.add_argument("--params-only", action="store_true", help="keep only the params subtree")
    convert.add_argument("--dtype", help="cast floating arrays, e.g. bfloat16")
    convert.add_argument("--format", choices=("orbax", "safetensors"), default="orbax")
    verify = verbs.add_parser("verify", parents=[common], help="read every array and check it; exit 1 on a failure")
    verify.add_argument("directory")
    verify.add_argument("--step", type=int, help="default: every step")
    return parser


def run_ckpt(argv: Sequence[str]) -> int:
    """Runs ``lepton-jax ckpt ARGV``; returns the exit status (0, 1 or 2, see the module doc)."""
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as exit_:  # argparse has printed the usage error (status 2) or the help (0)
        return int(exit_.code or 0)
    try:
        with _quiet_orbax():
            if args.verb == "ls":
                result = list_steps(args.directory)
            elif args.verb == "inspect":
                result = inspect_step(args.directory, args.step, sparsity=args.sparsity)
            elif args.verb == "diff":
                result = diff_checkpoints(args.a, args.b, args.step_a, args.step_b)
            elif args.verb == "convert":
                result = convert_checkpoint(args.src, args.dst, step=args.step, params_only=args.params_only,
                                            dtype=args.dtype, format=args.format)
            else:
                result = verify_checkpoint(args.directory, args.step)
    except (CheckpointCommandError, OSError, ValueError) as error:  # ValueError: e.g. a key holding '/'
        print(f"lepton-jax ckpt: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_json_safe(result), indent=2))
    else:
        _print_human(args.verb, result)
    if args.verb == "diff":
        return 0 if result["identical"] else 1
    if args.verb == "verify":
        return 0 if result["ok"] else 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lepton_jax.checkpoint.cli VERB ...``: the same as ``lepton-jax ckpt``."""
    return run_ckpt(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
