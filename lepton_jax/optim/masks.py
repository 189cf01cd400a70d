"""Which parameters get weight decay."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any
_NO_DECAY_NAMES = ("bias", "scale", "offset")


def _leaf_name(path) -> str:
    last = path[-1] if path else None
    for attr in ("key", "name", "idx"):
        if last is not None and hasattr(last, attr):
            return str(getattr(last, attr))
    return ""


def decay_mask(params: PyTree) -> PyTree:
    """True for weights to decay (kernels, embeddings: ``ndim >= 2``); False
    for biases and norm scales/offsets (``ndim <= 1`` or named ``bias``,
    ``scale``, ``offset``). Same structure as ``params``; works on any pytree.

    >>> import jax.numpy as jnp
    >>> decay_mask({"dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)}})
    {'dense': {'bias': False, 'kernel': True}, 'norm': {'scale': False}}
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, p: bool(np.ndim(p) >= 2 and _leaf_name(path) not in _NO_DECAY_NAMES), params
    )
