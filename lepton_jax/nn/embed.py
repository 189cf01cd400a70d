"""Token embeddings."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as linen
import jax
import jax.numpy as jnp


class Embed(linen.Module):
    """Looks up integer ids ``[...]`` in a ``[num_embeddings, features]`` table
    -> ``[..., features]``. ``attend(x)`` computes ``x @ table.T`` (tied
    output layer).

    Ids outside ``[0, num_embeddings)`` give NaN rows (``jnp.take``'s fill
    mode) rather than silently clamping.
    """

    num_embeddings: int
    features: int
    embedding_init: Callable[..., jax.Array] = linen.initializers.normal(stddev=1.0)
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param("embedding", self.embedding_init,
                                    (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
            raise TypeError(f"Embed: ids must be an integer array, got dtype {jnp.asarray(ids).dtype}")
        table = self.embedding.astype(self.dtype or self.param_dtype)
        return jnp.take(table, ids, axis=0)

    def attend(self, x_NxE: jax.Array) -> jax.Array:
        """``[..., features] -> [..., num_embeddings]`` logits against the table."""
        if x_NxE.shape[-1] != self.features:
            raise ValueError(f"Embed.attend: x must end with {self.features} features, got shape {x_NxE.shape}")
        dtype = self.dtype or x_NxE.dtype
        return jnp.dot(x_NxE.astype(dtype), self.embedding.astype(dtype).T)
