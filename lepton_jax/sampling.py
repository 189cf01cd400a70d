"""Token sampling, shared by ``models.generate`` and an exported model's
``Generator`` (so the same seed gives the same text in a script and from the
server). Imports only jax."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raises ``ValueError`` naming the sampling argument that is out of range."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"generate: temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0: all tokens), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1] (1: all tokens), got {top_p!r}")


@functools.partial(jax.jit, static_argnames=("top_k", "nucleus"))
def sample_logits(key: jax.Array, logits_BxV: jax.Array, temperature: jax.Array, top_k: int = 0,
                  top_p: jax.Array = 1.0, nucleus: bool = True) -> jax.Array:
    """One token per row ``int32[B]`` from ``logits [B, V]``: greedy at
    ``temperature == 0``, else drawn from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens (0: all) and to the
    smallest set whose probability reaches ``top_p`` (nucleus; 1: all).
    ``nucleus=False`` compiles without the nucleus step (a sort of the
    vocabulary per token) for callers that know ``top_p`` is 1."""
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1)
    scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth_Bx1 = jax.lax.top_k(scaled_BxV, min(top_k, scaled_BxV.shape[-1]))[0][:, -1:]
        scaled_BxV = jnp.where(scaled_BxV < kth_Bx1, -jnp.inf, scaled_BxV)
    if nucleus:
        # Keep a token when the probability of the tokens ranked above it is
        # still below top_p (so the most likely token always stays).
        sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_Bx1 = jnp.min(jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        scaled_BxV = jnp.where((top_p < 1) & (scaled_BxV < cutoff_Bx1), -jnp.inf, scaled_BxV)
    sampled_B = jax.random.categorical(key, scaled_BxV, axis=-1)
    return jnp.where(temperature == 0, greedy_B, sampled_B).astype(jnp.int32)


class Sampler:
    """Draws successive tokens with keys split from ``PRNGKey(seed)``, one
    split per token: ``sampler(logits_BxV) -> int32[B]``."""

    def __init__(self, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> None:
        check_sampling(temperature, top_k, top_p)
        self.temperature, self.top_k, self.top_p = float(temperature), int(top_k), float(top_p)
        self._key = jax.random.PRNGKey(seed)

    def __call__(self, logits_BxV: jax.Array) -> jax.Array:
        self._key, key = jax.random.split(self._key)
        return sample_logits(key, logits_BxV, jnp.float32(self.temperature), self.top_k, jnp.float32(self.top_p),
                             nucleus=self.top_p < 1)


__all__ = ["Sampler", "check_sampling", "sample_logits"]
