"""Input checks shared by the layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_float_input(where: str, x: jax.Array, min_rank: int = 1) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise TypeError(f"{where}: x must be floating point, got dtype {jnp.asarray(x).dtype}")
    if jnp.ndim(x) < min_rank:
        raise ValueError(f"{where}: x must have rank >= {min_rank}, got shape {jnp.shape(x)}")


def as_tuple(where: str, name: str, value, n: int) -> tuple[int, ...]:
    """An int broadcast to ``n`` dims, or a length-``n`` sequence."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{where}: {name} must be an int or have {n} entries, got {value}")
    return value


def check_stored_in_features(module, where: str, x: jax.Array, axis: int, what: str) -> None:
    """On apply, compares ``x``'s last axis with the stored kernel's input axis,
    so a mismatch names the layer and shapes instead of an initializer."""
    if module.has_variable("params", "kernel"):
        expected = jnp.shape(module.get_variable("params", "kernel"))[axis]
        if x.shape[-1] != expected:
            raise ValueError(f"{where}: x must have {expected} {what} (last axis), got shape {x.shape}")
