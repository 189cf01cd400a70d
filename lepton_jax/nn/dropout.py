"""Dropout with an explicit RNG stream."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp


class Dropout(linen.Module):
    """Zeroes each element with probability ``rate`` and scales the rest by
    ``1 / (1 - rate)`` (so the expectation is unchanged).

    Randomness comes from the ``"dropout"`` stream:
    ``apply(..., rngs={"dropout": key})``. ``deterministic=True`` is identity.
    """

    rate: float
    deterministic: bool | None = None

    @linen.compact
    def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout: rate must be in [0, 1), got {self.rate}")
        deterministic = linen.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, jnp.shape(x))
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
