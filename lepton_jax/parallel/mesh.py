"""Device meshes from a config mapping: ``{"data": -1, "fsdp": 1, "tensor": 1}``."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh


def _resolve(axes: Mapping[str, int], total: int, what: str) -> dict[str, int]:
    sizes = dict(axes)
    if not sizes:
        raise ValueError(f"make_mesh: {what} must name at least one axis, got {dict(axes)}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: at most one {what} axis may be -1, got {free}")
    for name, size in sizes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"make_mesh: {what} axis {name!r} must be a positive int or -1, got {size!r}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if total % fixed:
            raise ValueError(
                f"make_mesh: the {total} {what} devices do not divide by the fixed axes {sizes} (product {fixed})")
        sizes[free[0]] = total // fixed
    if math.prod(sizes.values()) != total:
        raise ValueError(
            f"make_mesh: {what} axes {sizes} multiply to {math.prod(sizes.values())}, but there are {total} devices")
    return sizes


def make_mesh(
    axes: Mapping[str, int],
    *,
    dcn: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh whose axes are ``axes`` in order; ``-1`` takes the remaining devices.

    ``dcn`` splits axes across slices/hosts (multi-slice TPU pods, GPU
    clusters): ``make_mesh({"data": -1, "fsdp": 4}, dcn={"data": 2})`` makes
    ``data`` span 2 slices (granules: TPU slices, else processes) times the
    devices within one. Axes are ``Auto`` so shardings come from ``jit``
    in/out shardings and constraints (from JAX 0.10 ``jax.make_mesh`` defaults
    to Explicit axes).
    """
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(axes)
    if dcn:
        unknown = set(dcn) - set(names)
        if unknown:
            raise ValueError(f"make_mesh: dcn names axes {sorted(unknown)} that are not in axes {list(names)}")
        dcn_sizes = _resolve({n: dcn.get(n, 1) for n in names}, math.prod(dcn.values()), "dcn")
        granules = math.prod(dcn_sizes.values())
        if len(devices) % granules:
            raise ValueError(f"make_mesh: {len(devices)} devices do not divide into {granules} dcn granules")
        ici = _resolve(axes, len(devices) // granules, "per-granule")
        is_tpu = devices[0].platform == "tpu"
        grid = mesh_utils.create_hybrid_device_mesh(
            [ici[n] for n in names], [dcn_sizes[n] for n in names], devices, process_is_granule=not is_tpu)
    else:
        sizes = _resolve(axes, len(devices), "mesh")
        try:
            grid = mesh_utils.create_device_mesh([sizes[n] for n in names], devices)
        except (ValueError, NotImplementedError):  # no physical topology (e.g. CPU): plain order
            grid = np.asarray(devices).reshape([sizes[n] for n in names])
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def describe_mesh(mesh: Mesh) -> str:
    """One line: axis sizes, device count and platform."""
    axes = ", ".join(f"{name}={size}" for name, size in mesh.shape.items())
    return f"mesh({axes}) over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"


def bytes_per_device(tree: Any) -> dict[str, int]:
    """How many bytes of ``tree``'s arrays each device holds (its shards),
    keyed by device, e.g. ``{"cpu:0": 1024, ...}``."""
    totals: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            key = f"{shard.device.platform}:{shard.device.id}"
            totals[key] = totals.get(key, 0) + int(shard.data.size) * shard.data.dtype.itemsize
    return totals


def describe_sharding(tree: Any, *, max_rows: int | None = None) -> str:
    """A table of ``tree``'s arrays: path, global shape, dtype, partition spec
    and the shape of one device's shard; then the bytes per device."""
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not hasattr(leaf, "sharding"):
            continue
        spec = getattr(leaf.sharding, "spec", None)
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        rows.append((jax.tree_util.keystr(path, simple=True, separator="/"), str(tuple(leaf.shape)),
                     str(leaf.dtype), str(spec) if spec is not None else type(leaf.sharding).__name__,
                     str(tuple(shard_shape))))
    shown = rows if max_rows is None else rows[:max_rows]
    headers = ("path", "shape", "dtype", "spec", "per device")
    widths = [max(len(h), *(len(r[i]) for r in shown)) if shown else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in shown]
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more arrays")
    per_device = bytes_per_device(tree)
    if per_device:
        values = sorted(per_device.values())
        lines.append(f"bytes per device: min {values[0]:,}, max {values[-1]:,} over {len(values)} devices; "
                     f"total {sum(values):,}")
    return "\n".join(lines)
