"""Max and average pooling over 1 or 2 spatial axes (channels last)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax.nn._checks import as_tuple, spatial_window
from lepton_jax.nn.conv import Padding, conv_padding


def _pool_args(where: str, x: jax.Array, window, strides, padding):
    """Window, strides and padding over all of ``x``'s axes (1 on batch and channels)."""
    window = spatial_window(where, "window", window, x)
    n = len(window)
    strides = window if strides is None else as_tuple(where, "strides", strides, n)
    pad = conv_padding(where, padding, n)
    if not isinstance(pad, str):
        pad = [(0, 0), *pad, (0, 0)]
    return (1, *window, 1), (1, *strides, 1), pad


def max_pool(x: jax.Array, window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
    """Maximum over windows: ``[B, L, C]`` or ``[B, H, W, C]`` -> same rank.

    ``window`` has 1 or 2 entries (an int covers every spatial axis of ``x``);
    ``strides`` default to the window. Padded positions count as ``-inf`` so
    they never win.
    """
    dims, strides, pad = _pool_args("max_pool", x, window, strides, padding)
    # A Python-scalar init keeps lax's differentiable reduce_window_max primitive
    # (an array init falls back to a generic reduce_window without autodiff).
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pad)


def avg_pool(x: jax.Array, window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: Padding = "VALID") -> jax.Array:
    """Mean over windows, arguments as ``max_pool``.

    With padding ("SAME", an int or pairs) each window averages only its real
    elements: a border window covering 2 real elements of 4 is their mean, not
    half of it (padding is not counted as zeros).
    """
    dims, strides, pad = _pool_args("avg_pool", x, window, strides, padding)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
    # Count real elements per window with the same reduction over ones; the
    # count depends only on the spatial shape, so batch and channels are 1.
    ones = jnp.ones((1, *x.shape[1:-1], 1), x.dtype)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)
    return sums / counts


class MaxPool(linen.Module):
    """Module form of ``max_pool`` (no parameters)."""

    window: int | Sequence[int]
    strides: int | Sequence[int] | None = None
    padding: Padding = "VALID"

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool(x, self.window, self.strides, self.padding)


class AvgPool(linen.Module):
    """Module form of ``avg_pool`` (no parameters)."""

    window: int | Sequence[int]
    strides: int | Sequence[int] | None = None
    padding: Padding = "VALID"

    def __call__(self, x: jax.Array) -> jax.Array:
        return avg_pool(x, self.window, self.strides, self.padding)
