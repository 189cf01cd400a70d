"""Input checks shared by the layers."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp

_LAYOUTS = {1: "[batch, length, channels]", 2: "[batch, height, width, channels]"}


def check_float_input(where: str, x: jax.Array, min_rank: int = 1) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise TypeError(f"{where}: x must be floating point, got dtype {jnp.asarray(x).dtype}")
    if jnp.ndim(x) < min_rank:
        raise ValueError(f"{where}: x must have rank >= {min_rank}, got shape {jnp.shape(x)}")


def as_tuple(where: str, name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """An int broadcast to ``n`` dims, or a length-``n`` sequence."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{where}: {name} must be an int or have {n} entries, got {value}")
    return value


def spatial_window(where: str, name: str, size: int | Sequence[int], x: jax.Array) -> tuple[int, ...]:
    """Checks a channels-last ``x`` of 1 or 2 spatial axes against a window
    ``size`` (kernel or pool); an int applies to every spatial axis of ``x``."""
    check_float_input(where, x)
    if isinstance(size, int):
        if x.ndim not in (3, 4):
            raise ValueError(f"{where}: x must have rank 3 {_LAYOUTS[1]} or 4 {_LAYOUTS[2]}, got shape {x.shape}")
        return (size,) * (x.ndim - 2)
    size = tuple(size)
    if len(size) not in (1, 2):
        raise ValueError(f"{where}: {name} must be an int or have 1 or 2 entries, got {size}")
    n = len(size)
    if x.ndim != n + 2:
        raise ValueError(f"{where}: x must have rank {n + 2} {_LAYOUTS[n]} for a {n}D {name}, got shape {x.shape}")
    return size


def check_stored_in_features(module, where: str, x: jax.Array, axis: int, what: str, param: str = "kernel") -> None:
    """On apply, compares ``x``'s last axis with axis ``axis`` of the stored
    ``param``, so a mismatch names the layer and shapes instead of an initializer."""
    if module.has_variable("params", param):
        # Variables straight from init may still be boxed with their logical axes.
        stored = linen.meta.unbox(module.get_variable("params", param))
        expected = jnp.shape(stored)[axis]
        if x.shape[-1] != expected:
            raise ValueError(f"{where}: x must have {expected} {what} (last axis), got shape {x.shape}")


def cast(x, dtype):
    """``x.astype(dtype)``, skipped when ``x`` already has it: parameters that
    are wrapped (e.g. qwix's quantized weights) then reach the matmul as they
    are, so its interception sees the quantized array."""
    return x if getattr(x, "dtype", None) == jnp.dtype(dtype) else x.astype(dtype)


def compute_dtype_of_input(x: Any, *params: Any, dtype: Any = None, inexact: bool = True) -> tuple[Any, ...]:
    """A ``promote_dtype`` for linen's layers: every array in ``dtype``, or in
    ``x``'s dtype when ``dtype`` is None (``None`` entries stay ``None``)."""
    del inexact  # the layers check that x is floating point
    target = dtype or jnp.asarray(x).dtype
    return tuple(None if a is None else cast(a, target) for a in (x, *params))
