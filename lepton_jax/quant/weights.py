"""Int8 storage of frozen float weights: symmetric, one scale per output channel.

Unlike ``ptq`` (qwix rewrites the matmuls to run in int8), this is storage
only: ``dequantize`` gives the float32 weights back for any code that takes
floats, e.g. a LoRA fine-tune's frozen base (``lepton_jax.lora.freeze``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

INT8_MAX = 127


class Int8Weight(NamedTuple):
    """A weight ``[..., out]`` stored as int8 ``values`` (same shape) and
    float32 ``scale`` ``[out]``: ``weight ~ values * scale``.

    A NamedTuple, so a pytree: ``jax.tree`` functions, ``jit`` and
    checkpoints see its two arrays as leaves.
    """

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)


def quantize_int8(x: jax.Array) -> Int8Weight:
    """``x`` ``[..., out]`` (floating, >= 2 dims) as an ``Int8Weight``.

    Symmetric absmax per output channel (the last axis): ``scale = max|x| /
    127`` over every other axis, ``values = round(x / scale)`` in [-127, 127],
    so ``|dequantize(w) - x| <= scale / 2`` elementwise. An all-zero channel
    gets scale 0 and values 0.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"quantize_int8: x must be floating point, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"quantize_int8: x must have at least 2 dims (scales run along the last), "
                         f"got shape {x.shape}")
    x = x.astype(jnp.float32)
    absmax_O = jnp.max(jnp.abs(x), axis=tuple(range(x.ndim - 1)))
    scale_O = absmax_O / INT8_MAX
    safe_O = jnp.where(scale_O > 0, scale_O, 1.0)
    values = jnp.clip(jnp.round(x / safe_O), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8Weight(values=values, scale=scale_O)


def dequantize(w: Int8Weight) -> jax.Array:
    """The float32 weight ``values * scale`` of an ``Int8Weight``."""
    if not isinstance(w, Int8Weight):
        raise TypeError(f"dequantize: w must be an Int8Weight, got {type(w).__name__}")
    if w.values.dtype != jnp.int8 or jnp.shape(w.scale) != w.values.shape[-1:]:
        raise ValueError(f"dequantize: expected int8 values [..., out] and scale [out], got values "
                         f"{w.values.dtype} {tuple(w.values.shape)} and scale {tuple(jnp.shape(w.scale))}")
    return w.values.astype(jnp.float32) * w.scale.astype(jnp.float32)
