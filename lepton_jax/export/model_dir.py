"""``export_model``: a function and its params to a versioned model directory.

The function is serialized with ``jax.export`` (StableHLO, lowered for every
platform in ``platforms`` from whatever machine runs the export) with a
symbolic batch dimension ``b``; the params are a flat ``.npz``. The directory
layout is described in ``loader.py``, which reads it back with jax and numpy
only.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import shutil
import sys
import uuid
import zipfile
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from lepton_jax._pytree import path_str as _path_str
from lepton_jax.export import loader

PyTree = Any
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
_RESERVED_METADATA = ("version", "created", "platforms", "libraries")


def export_model(
    out_dir: str | os.PathLike,
    apply_fn: Callable[..., Any],
    params: PyTree,
    example_inputs: Any,
    *,
    input_names: Sequence[str] = ("inputs",),
    output_names: Sequence[str] = ("outputs",),
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    preprocessing: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    version: int | None = None,
) -> str:
    """Writes ``apply_fn(params, *inputs)`` as ``out_dir/<version>/``.

    Args:
      out_dir: the model directory; created if missing.
      apply_fn: ``(params, *inputs) -> outputs``, traceable by ``jax.jit``
        (e.g. ``lambda variables, x: model.apply(variables, x)``).
      params: a pytree (nested dicts/lists) of arrays; saved beside the function.
      example_inputs: one array ``[B, ...]`` or a tuple of them; only shapes
        and dtypes are used. The leading dimension of every input becomes the
        shared symbolic batch ``b``; the other dimensions are fixed.
      input_names / output_names: one name per input / per (flattened) output.
      platforms: where the export must run: any of ``"cpu"``, ``"cuda"``,
        ``"rocm"``, ``"tpu"`` (all are lowered here, no device needed).
      preprocessing: applied by the loader to raw inputs, e.g.
        ``{"normalize": {"mean": m, "std": s}}`` (``"input": name`` picks the
        input; default the first).
      metadata: extra JSON for ``metadata.json``, e.g. ``{"source":
        {"checkpoint_dir": ..., "step": ...}, "metrics": {...}}``.
      version: the version number; ``None``: one more than the largest present.

    Returns:
      The path of the written version directory.
    """
    inputs = _as_input_tuple(example_inputs)
    input_names, output_names = _check_names(input_names, "input_names"), _check_names(output_names, "output_names")
    if len(input_names) != len(inputs):
        raise ValueError(f"export_model: input_names has {len(input_names)} names {list(input_names)} but "
                         f"example_inputs has {len(inputs)} arrays")
    for name, x in zip(input_names, inputs):
        if len(x.shape) < 1:
            raise ValueError(f"export_model: input {name!r} needs a leading batch dimension, got a scalar")
    platforms = tuple(platforms)
    if not platforms:
        raise ValueError("export_model: platforms must name at least one platform, got ()")
    preprocessing = _check_preprocessing(preprocessing, input_names)
    metadata = dict(metadata or {})
    reserved = sorted(set(metadata) & set(_RESERVED_METADATA))
    if reserved:
        raise ValueError(f"export_model: metadata keys {reserved} are written by export_model itself")
    if version is not None and (not isinstance(version, int) or version < 1):
        raise ValueError(f"export_model: version must be a positive int or None, got {version!r}")

    params = _plain_dicts(params)
    param_specs, arrays = _flatten_params(params)
    exported = _export(apply_fn, params, inputs, platforms)
    if len(exported.out_avals) != len(output_names):
        raise ValueError(f"export_model: output_names has {len(output_names)} names {list(output_names)} but "
                         f"apply_fn returns {len(exported.out_avals)} arrays")
    signature = {
        "format_version": loader.FORMAT_VERSION,
        "batch_dim": loader.BATCH_SYMBOL,
        "platforms": list(exported.platforms),
        "inputs": [_tensor_spec(n, a) for n, a in zip(input_names, exported.in_avals[len(arrays):])],
        "outputs": [_tensor_spec(n, a) for n, a in zip(output_names, exported.out_avals)],
        "params": param_specs,
        "preprocessing": preprocessing,
    }
    metadata_json = {
        "version": None,  # set per attempt below
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platforms": list(exported.platforms),
        "libraries": _library_versions(),
        **metadata,
    }
    blob = bytes(exported.serialize())
    return _write_version_dir(os.fspath(out_dir), version, blob, arrays, signature, metadata_json)


# -- helpers ------------------------------------------------------------------


def _as_input_tuple(example_inputs: Any) -> tuple[Any, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, x in enumerate(inputs):
        if not (hasattr(x, "shape") and hasattr(x, "dtype")):
            raise TypeError(f"export_model: example_inputs[{i}] must be an array or jax.ShapeDtypeStruct, "
                            f"got {type(x).__name__}")
    return inputs


def _check_names(names: Sequence[str], where: str) -> tuple[str, ...]:
    names = (names,) if isinstance(names, str) else tuple(names)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"export_model: {where} must be distinct non-empty strings, got {list(names)}")
    return names


def _check_preprocessing(preprocessing: Mapping[str, Any] | None, input_names: Sequence[str]) -> dict[str, Any]:
    result = {}
    for op, args in dict(preprocessing or {}).items():
        if op not in loader.PREPROCESSING_OPS:
            raise ValueError(f"export_model: preprocessing op {op!r} is not one of {loader.PREPROCESSING_OPS}")
        args = dict(args)
        target = args.get("input", input_names[0])
        if target not in input_names:
            raise ValueError(f"export_model: preprocessing {op!r} targets input {target!r}; inputs are "
                             f"{list(input_names)}")
        if op == "normalize":
            if set(args) - {"mean", "std", "input"} or not {"mean", "std"} <= set(args):
                raise ValueError(f"export_model: preprocessing 'normalize' takes mean, std (and input), got "
                                 f"{sorted(args)}")
            std = np.asarray(args["std"], np.float32)
            if not np.all(std > 0):
                raise ValueError(f"export_model: preprocessing 'normalize' needs std > 0, got {std.tolist()}")
            args = {**args, "mean": np.asarray(args["mean"], np.float32).tolist(), "std": std.tolist()}
        result[op] = args
    return result


def _plain_dicts(tree: PyTree) -> PyTree:
    # Mappings (e.g. flax FrozenDict) become dicts, so the exported in_tree
    # uses only built-in node types and deserializes without flax.
    if isinstance(tree, Mapping):
        return {k: _plain_dicts(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_plain_dicts(v) for v in tree)
    return tree


def _flatten_params(params: PyTree) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The params' leaves in flatten order: JSON specs and ``{path: array}``."""
    specs, arrays = [], {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = _path_str(path)
        if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
            raise TypeError(f"export_model: params leaf {name!r} must be an array, got {type(leaf).__name__}")
        if name in arrays:
            raise ValueError(f"export_model: two params leaves share the path {name!r} (a key containing '/'?)")
        array = np.asarray(leaf)
        specs.append({"path": name, "shape": list(array.shape), "dtype": str(array.dtype)})
        arrays[name] = array
    return specs, arrays


def _export(apply_fn: Callable[..., Any], params: PyTree, inputs: tuple[Any, ...],
            platforms: tuple[str, ...]) -> jax.export.Exported:
    def fn(params, *inputs):
        return apply_fn(params, *inputs)

    fn.__name__ = getattr(apply_fn, "__name__", "apply_fn")
    # One spec string for every input: all share the symbol b (one scope).
    batch_spec = f"{loader.BATCH_SYMBOL}, ..."
    specs = jax.export.symbolic_args_specs((params, *inputs), (None, *(batch_spec for _ in inputs)))
    return jax.export.export(jax.jit(fn), platforms=platforms)(*specs)


def _tensor_spec(name: str, aval: Any) -> dict[str, Any]:
    shape = [int(d) if isinstance(d, (int, np.integer)) else str(d) for d in aval.shape]
    return {"name": name, "dtype": str(np.dtype(aval.dtype)), "shape": shape}


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in ("jax", "jaxlib", "flax", "lepton_jax"):
        module = sys.modules.get(name)
        version = getattr(module, "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = "not installed"
        versions[name] = str(version)
    return versions


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"export_model: metadata value of type {type(value).__name__} is not JSON-serializable")


def _write_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    # np.savez takes names as keyword arguments, which breaks on names like
    # "file"; write the same zip of .npy members directly.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, loader.encode_array(array), allow_pickle=False)


def _next_version(out_dir: str) -> int:
    versions = [int(name) for name in os.listdir(out_dir) if name.isdigit()]
    return max(versions, default=0) + 1


def _write_version_dir(out_dir: str, version: int | None, blob: bytes, arrays: Mapping[str, np.ndarray],
                       signature: Mapping[str, Any], metadata: dict[str, Any]) -> str:
    """Writes a hidden temporary folder, then renames it to ``<version>``:
    a reader never sees a half-written version, and concurrent exports
    into one ``out_dir`` get distinct versions."""
    os.makedirs(out_dir, exist_ok=True)
    for _ in range(10):
        number = version if version is not None else _next_version(out_dir)
        final = os.path.join(out_dir, str(number))
        if os.path.exists(final):
            if version is not None:
                raise FileExistsError(f"export_model: version {version} already exists at {final}")
            continue
        tmp = os.path.join(out_dir, f".tmp-{number}-{uuid.uuid4().hex}")
        os.makedirs(tmp)
        with open(os.path.join(tmp, loader.MODEL_FILE), "wb") as f:
            f.write(blob)
        _write_npz(os.path.join(tmp, loader.PARAMS_FILE), arrays)
        with open(os.path.join(tmp, loader.SIGNATURE_FILE), "w", encoding="utf-8") as f:
            json.dump(signature, f, indent=2)
        with open(os.path.join(tmp, loader.METADATA_FILE), "w", encoding="utf-8") as f:
            json.dump({**metadata, "version": number}, f, indent=2, default=_json_default)
        try:
            os.rename(tmp, final)
        except OSError:  # another export took this number first
            shutil.rmtree(tmp)
            if version is not None:
                raise FileExistsError(f"export_model: version {version} already exists at {final}") from None
            continue
        return final
    raise RuntimeError(f"export_model: could not claim a new version number in {out_dir}")
