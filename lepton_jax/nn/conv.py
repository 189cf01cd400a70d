"""1D and 2D convolutions (channels last)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax.nn._checks import as_tuple, cast, check_stored_in_features, spatial_window

Padding = str | int | Sequence[tuple[int, int]]


def conv_padding(where: str, padding: Padding, n: int) -> str | list[tuple[int, int]]:
    """"SAME"/"VALID", an int for every side, or ``n`` ``(low, high)`` pairs."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"{where}: padding must be 'SAME', 'VALID', an int or (low, high) pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pairs = [tuple(p) for p in padding]
    if len(pairs) != n or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{where}: padding must have {n} (low, high) pairs, got {padding}")
    return pairs


class Conv(linen.Module):
    """Cross-correlation over 1 or 2 spatial axes (``len(kernel_size)``; an int
    kernel_size covers every spatial axis of ``x``).

    ``x`` is ``[B, L, C]`` (1D) or ``[B, H, W, C]`` (2D) -> ``[B, L', features]``
    or ``[B, H', W', features]``. ``strides`` and ``dilation`` (kernel
    dilation) are ints or per-axis; ``padding`` is "SAME", "VALID", an int for
    every side or per-axis ``(low, high)`` pairs. Kernel: ``[*kernel_size, C, features]``.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    dilation: int | Sequence[int] = 1
    use_bias: bool = True
    kernel_init: Callable[..., jax.Array] = linen.initializers.lecun_normal()
    bias_init: Callable[..., jax.Array] = linen.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = spatial_window("Conv", "kernel_size", self.kernel_size, x)
        n = len(kernel_size)
        strides = as_tuple("Conv", "strides", self.strides, n)
        dilation = as_tuple("Conv", "dilation", self.dilation, n)
        padding = conv_padding("Conv", self.padding, n)
        check_stored_in_features(self, "Conv", x, -2, "channels")
        kernel = self.param("kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or x.dtype
        spatial = "HW"[:n]
        dims = jax.lax.conv_dimension_numbers(
            x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
        y = jax.lax.conv_general_dilated(
            cast(x, dtype), cast(kernel, dtype), window_strides=strides, padding=padding,
            rhs_dilation=dilation, dimension_numbers=dims)
        if self.use_bias:
            y = y + cast(self.param("bias", self.bias_init, (self.features,), self.param_dtype), dtype)
        return y
