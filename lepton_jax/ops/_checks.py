"""Input validation shared by the ops: clear errors naming function, argument,
expected and received."""

from __future__ import annotations

import jax
import jax.numpy as jnp

REDUCTIONS = ("mean", "sum", "none")


def check_floating(where: str, name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise TypeError(f"{where}: {name} must be floating point, got dtype {jnp.asarray(x).dtype}")


def check_integer(where: str, name: str, x: jax.Array) -> None:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
        raise TypeError(f"{where}: {name} must be an integer array, got dtype {jnp.asarray(x).dtype}")


def check_same_shape(where: str, name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"{where}: {name_b} must have the shape of {name_a} {jnp.shape(a)}, got {jnp.shape(b)}"
        )


def check_labels(where: str, logits: jax.Array, labels: jax.Array) -> None:
    """``labels`` must be integer with ``logits.shape[:-1]``."""
    check_integer(where, "labels", labels)
    if jnp.ndim(logits) < 1:
        raise ValueError(f"{where}: logits must have a class axis, got shape {jnp.shape(logits)}")
    if jnp.shape(labels) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"{where}: labels must have shape {jnp.shape(logits)[:-1]} (logits without the class axis), "
            f"got {jnp.shape(labels)}"
        )


def check_mask(where: str, mask: jax.Array | None, shape: tuple[int, ...], name: str = "mask") -> None:
    if mask is None:
        return
    if jnp.shape(mask) != tuple(shape):
        raise ValueError(f"{where}: {name} must have shape {tuple(shape)}, got {jnp.shape(mask)}")


def reduce(where: str, values: jax.Array, reduction: str, weights: jax.Array | None = None) -> jax.Array:
    """Mean (over ``weights`` when given), sum or no reduction."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "none":
        return values
    if weights is not None:
        values = values * weights
    total = jnp.sum(values)
    if reduction == "sum":
        return total
    count = jnp.sum(weights) if weights is not None else values.size
    # max(count, 1): an all-masked batch averages to 0, not NaN.
    return total / jnp.maximum(count, 1)
