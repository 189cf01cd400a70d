"""Dropout: ``flax.linen.Dropout`` with its rate checked."""

from __future__ import annotations

import flax.linen as linen
import jax


class Dropout(linen.Dropout):
    """``flax.linen.Dropout`` (zeroes each element with probability ``rate``,
    scales the rest by ``1 / (1 - rate)``; randomness from the ``"dropout"``
    stream; ``deterministic=True`` is identity), refusing a rate outside
    ``[0, 1)`` with a clear error instead of dropping everything."""

    def __call__(self, inputs: jax.Array, deterministic: bool | None = None, rng=None) -> jax.Array:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {self.rate}")
        return super().__call__(inputs, deterministic=deterministic, rng=rng)
