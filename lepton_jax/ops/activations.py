"""Activation functions, and lookup by name for configs."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def relu(x: jax.Array) -> jax.Array:
    return jax.nn.relu(x)


def relu6(x: jax.Array) -> jax.Array:
    return jax.nn.relu6(x)


def leaky_relu(x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    return jax.nn.leaky_relu(x, negative_slope)


def elu(x: jax.Array, alpha: float = 1.0) -> jax.Array:
    return jax.nn.elu(x, alpha)


def gelu(x: jax.Array, approximate: bool = True) -> jax.Array:
    """GELU; ``approximate=True`` is the tanh form used by GPT-2."""
    return jax.nn.gelu(x, approximate=approximate)


def silu(x: jax.Array) -> jax.Array:
    """SiLU / swish: ``x * sigmoid(x)``."""
    return jax.nn.silu(x)


swish = silu


def sigmoid(x: jax.Array) -> jax.Array:
    return jax.nn.sigmoid(x)


def tanh(x: jax.Array) -> jax.Array:
    return jnp.tanh(x)


def softplus(x: jax.Array) -> jax.Array:
    return jax.nn.softplus(x)


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    return jax.nn.softmax(x, axis=axis)


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    return jax.nn.log_softmax(x, axis=axis)


def identity(x: jax.Array) -> jax.Array:
    return x


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": relu, "relu6": relu6, "leaky_relu": leaky_relu, "elu": elu, "gelu": gelu,
    "gelu_exact": lambda x: gelu(x, approximate=False), "silu": silu, "swish": swish,
    "sigmoid": sigmoid, "tanh": tanh, "softplus": softplus, "identity": identity, "linear": identity,
}


def get_activation(name_or_fn: str | Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation called ``name_or_fn``, or the callable itself."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in ACTIVATIONS:
        raise ValueError(f"get_activation: unknown activation {name_or_fn!r}; known: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name_or_fn]
