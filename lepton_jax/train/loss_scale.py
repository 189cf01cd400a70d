"""Dynamic loss scaling for float16 training.

float16 has 5 exponent bits: small activation gradients underflow to zero
unless the loss is multiplied by a large factor before differentiation (and
the gradients divided by it after). The factor is adapted as training runs:
a step whose gradients are not all finite is skipped (parameters and
optimizer state unchanged) and the scale is multiplied by
``backoff_factor``; after ``growth_interval`` finite steps in a row it is
multiplied by ``growth_factor``. bfloat16 has float32's range and needs none
of this.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

PyTree = Any


@struct.dataclass
class DynamicLossScale:
    """Loss-scale state carried in ``TrainState.loss_scale``.

    Attributes:
      scale: fp32 scalar, the current factor.
      good_steps: int32 scalar, finite steps since the last change.
    """

    scale: jax.Array
    good_steps: jax.Array
    growth_interval: int = struct.field(pytree_node=False, default=2000)
    growth_factor: float = struct.field(pytree_node=False, default=2.0)
    backoff_factor: float = struct.field(pytree_node=False, default=0.5)
    min_scale: float = struct.field(pytree_node=False, default=1.0)

    @classmethod
    def create(cls, initial_scale: float = 2.0**15, *, growth_interval: int = 2000, growth_factor: float = 2.0,
               backoff_factor: float = 0.5, min_scale: float = 1.0) -> "DynamicLossScale":
        """A fresh state at ``initial_scale``; factors must satisfy
        ``growth_factor > 1``, ``0 < backoff_factor < 1``, ``growth_interval >= 1``."""
        if not growth_factor > 1.0:
            raise ValueError(f"DynamicLossScale: growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"DynamicLossScale: backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"DynamicLossScale: growth_interval must be >= 1, got {growth_interval}")
        if not initial_scale >= min_scale > 0:
            raise ValueError(f"DynamicLossScale: need initial_scale >= min_scale > 0, got {initial_scale}, {min_scale}")
        return cls(scale=jnp.asarray(initial_scale, jnp.float32), good_steps=jnp.zeros((), jnp.int32),
                   growth_interval=int(growth_interval), growth_factor=float(growth_factor),
                   backoff_factor=float(backoff_factor), min_scale=float(min_scale))

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        """``loss * scale`` (in the loss's dtype promoted with fp32)."""
        return loss * self.scale

    def unscale(self, grads: PyTree) -> PyTree:
        """Gradients of the scaled loss divided back by the scale."""
        inverse = 1.0 / self.scale
        return jax.tree.map(lambda g: (g * inverse).astype(g.dtype), grads)

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        """The next state after a step whose gradients were finite or not."""
        grow = grads_finite & (self.good_steps + 1 >= self.growth_interval)
        scale = jnp.where(grads_finite, jnp.where(grow, self.scale * self.growth_factor, self.scale),
                          jnp.maximum(self.scale * self.backoff_factor, self.min_scale))
        good_steps = jnp.where(grads_finite & ~grow, self.good_steps + 1, 0)
        return self.replace(scale=scale.astype(jnp.float32), good_steps=good_steps.astype(jnp.int32))


def all_finite(tree: PyTree) -> jax.Array:
    """A bool scalar: every element of every floating leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)




def as_loss_scale(loss_scale: Any) -> DynamicLossScale | None:
    """What a train state holds for ``create_train_state(loss_scale=...)``:
    ``None``, ``"dynamic"`` (a fresh ``DynamicLossScale``) or a ``DynamicLossScale``."""
    if loss_scale is None or isinstance(loss_scale, DynamicLossScale):
        return loss_scale
    if loss_scale == "dynamic":
        return DynamicLossScale.create()
    raise ValueError(f"create_train_state: loss_scale must be None, 'dynamic' or a DynamicLossScale, got {loss_scale!r}")
