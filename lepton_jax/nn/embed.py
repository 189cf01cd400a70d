"""Token embeddings: ``flax.linen.Embed`` with errors that name the problem."""

from __future__ import annotations

from typing import Callable

import flax.linen as linen
import jax
import jax.numpy as jnp


class Embed(linen.Embed):
    """``flax.linen.Embed``: integer ids ``[...]`` looked up in a
    ``[num_embeddings, features]`` table -> ``[..., features]``;
    ``attend(x)`` computes ``x @ table.T`` (tied output layer). Ids outside
    ``[0, num_embeddings)`` give NaN rows (``jnp.take``'s fill mode) rather
    than silently clamping.

    Added here: the table starts ``normal(1.0)``, and float ids or an
    ``attend`` input of the wrong width get an error naming what was received.
    """

    embedding_init: Callable[..., jax.Array] = linen.initializers.normal(stddev=1.0)

    def __call__(self, ids: jax.Array) -> jax.Array:
        if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
            raise TypeError(f"Embed: ids must be an integer array, got dtype {jnp.asarray(ids).dtype}")
        return super().__call__(ids)

    def attend(self, x_NxE: jax.Array) -> jax.Array:
        """``[..., features] -> [..., num_embeddings]`` logits against the table."""
        if x_NxE.shape[-1] != self.features:
            raise ValueError(f"Embed.attend: x must end with {self.features} features, got shape {x_NxE.shape}")
        return super().attend(x_NxE)
