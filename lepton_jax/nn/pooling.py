"""Max and average pooling over 1 or 2 spatial axes (channels last)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax.nn._checks import as_tuple, check_float_input
from lepton_jax.nn.conv import Padding, conv_padding


def _pool_args(where, x, window, strides, padding):
    window = (window,) if isinstance(window, int) else tuple(window)
    n = len(window)
    if n not in (1, 2):
        raise ValueError(f"{where}: window must have 1 or 2 entries, got {window}")
    check_float_input(where, x)
    if x.ndim != n + 2:
        raise ValueError(f"{where}: x must have rank {n + 2} [batch, *spatial({n}), channels], got shape {x.shape}")
    strides = window if strides is None else as_tuple(where, "strides", strides, n)
    pad = conv_padding(where, padding, n)
    if not isinstance(pad, str):
        pad = [(0, 0), *pad, (0, 0)]
    return (1, *window, 1), (1, *strides, 1), pad


def max_pool(x: jax.Array, window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
    """Max over windows; ``x`` ``[B, L, C]`` or ``[B, H, W, C]``; strides default to the window.
    Padded positions never win (they count as -inf)."""
    dims, strides, pad = _pool_args("max_pool", x, window, strides, padding)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pad)


def avg_pool(x: jax.Array, window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
    """Mean over windows. With padding, each window averages only its real
    (unpadded) elements."""
    dims, strides, pad = _pool_args("avg_pool", x, window, strides, padding)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
    counts = jax.lax.reduce_window(jnp.ones(x.shape[1:-1], x.dtype)[None, ..., None], 0.0, jax.lax.add,
                                   dims, strides, pad)
    return sums / counts


class MaxPool(linen.Module):
    """Module form of ``max_pool``."""

    window: int | Sequence[int]
    strides: int | Sequence[int] | None = None
    padding: Padding = "VALID"

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool(x, self.window, self.strides, self.padding)


class AvgPool(linen.Module):
    """Module form of ``avg_pool``."""

    window: int | Sequence[int]
    strides: int | Sequence[int] | None = None
    padding: Padding = "VALID"

    def __call__(self, x: jax.Array) -> jax.Array:
        return avg_pool(x, self.window, self.strides, self.padding)
