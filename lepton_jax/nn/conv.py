"""1D and 2D convolutions (channels last): ``flax.linen.Conv`` with checks."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as linen
import jax

from lepton_jax.nn._checks import as_tuple, compute_dtype_of_input, spatial_window

Padding = str | int | Sequence[tuple[int, int]]
_PADDINGS = ("SAME", "VALID", "CIRCULAR", "REFLECT", "CAUSAL")


def conv_padding(where: str, padding: Padding, n: int,
                 modes: Sequence[str] = ("SAME", "VALID")) -> str | list[tuple[int, int]]:
    """One of ``modes``, an int for every side, or ``n`` ``(low, high)`` pairs."""
    if isinstance(padding, str):
        if padding.upper() not in modes:
            raise ValueError(f"{where}: padding must be {', '.join(map(repr, modes))}, an int or (low, high) pairs, "
                             f"got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return [(padding, padding)] * n
    pairs = [tuple(p) for p in padding]
    if len(pairs) != n or any(len(p) != 2 for p in pairs):
        raise ValueError(f"{where}: padding must have {n} (low, high) pairs, got {padding}")
    return pairs


class Conv(linen.Conv):
    """``flax.linen.Conv``: cross-correlation over 1 or 2 spatial axes.

    ``x`` is ``[B, L, C]`` (1D) or ``[B, H, W, C]`` (2D) -> ``[B, L', features]``
    or ``[B, H', W', features]``; kernel ``[*kernel_size, C, features]``.
    Added here: an int ``kernel_size`` covers every spatial axis of ``x``
    (linen reads it as 1D), ``dtype=None`` computes in the input's dtype, and
    an input of the wrong rank, dtype or channel count gets an error naming
    what was received (linen would fold extra axes into the batch). Every
    linen field (``kernel_dilation``, ``feature_group_count``, ...) works as
    in linen.
    """

    kernel_size: int | Sequence[int]
    promote_dtype: Callable[..., tuple[Any, ...]] = compute_dtype_of_input

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel_size = spatial_window("Conv", "kernel_size", self.kernel_size, x)
        n = len(kernel_size)
        for name in ("strides", "input_dilation", "kernel_dilation"):
            as_tuple("Conv", name, getattr(self, name) or 1, n)
        padding = conv_padding("Conv", self.padding, n, _PADDINGS)
        if self.has_variable("params", "kernel"):
            stored = linen.meta.unbox(self.get_variable("params", "kernel"))
            channels = stored.shape[-2] * self.feature_group_count
            if x.shape[-1] != channels:
                raise ValueError(f"Conv: x must have {channels} channels (last axis), got shape {x.shape}")
        if kernel_size != self.kernel_size or padding != self.padding:
            # The same module with the spelled-out fields, bound to this scope:
            # the parameters are this layer's own ("kernel", "bias").
            return super(Conv, self.clone(parent=self.scope, kernel_size=kernel_size, padding=padding)).__call__(x)
        return super().__call__(x)
