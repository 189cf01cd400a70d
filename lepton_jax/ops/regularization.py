"""L1/L2 penalty terms over parameter pytrees."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
Mask = PyTree | Callable[[PyTree], PyTree] | None


def weight_mask(params: PyTree) -> PyTree:
    """True for leaves with ``ndim >= 2`` (kernels, embeddings), False for
    biases and norm scales (``ndim <= 1``), which are usually not penalised."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def l2_penalty(params: PyTree, *, mask: Mask = None) -> jax.Array:
    """``0.5 * sum(w ** 2)`` over the (masked) leaves, in fp32.

    >>> import jax.numpy as jnp
    >>> params = {"kernel": jnp.array([[1.0, 2.0]]), "bias": jnp.array([3.0])}
    >>> float(l2_penalty(params)), float(l2_penalty(params, mask=weight_mask(params)))
    (7.0, 2.5)

    ``weight_mask`` (``ndim >= 2``) leaves biases and norm scales out.
    The 0.5 makes the gradient ``w``, so ``weight * l2_penalty`` matches an
    optimizer's coupled weight decay of ``weight``.
    """
    return 0.5 * _masked_sum(params, mask, jnp.square, "l2_penalty")


def l1_penalty(params: PyTree, *, mask: Mask = None) -> jax.Array:
    """``sum(|w|)`` over the (masked) leaves, in fp32."""
    return _masked_sum(params, mask, jnp.abs, "l1_penalty")


def _masked_sum(params: PyTree, mask: Mask, fn: Callable, where: str) -> jax.Array:
    if callable(mask):
        mask = mask(params)
    leaves = jax.tree.leaves(params)
    if mask is None:
        keep = [True] * len(leaves)
    else:
        if jax.tree.structure(mask) != jax.tree.structure(params):
            raise ValueError(
                f"{where}: mask must have the structure of params {jax.tree.structure(params)}, "
                f"got {jax.tree.structure(mask)}"
            )
        keep = jax.tree.leaves(mask)
    total = jnp.zeros((), jnp.float32)
    for leaf, use in zip(leaves, keep):
        if use:
            total = total + jnp.sum(fn(jnp.asarray(leaf).astype(jnp.float32)))
    return total
