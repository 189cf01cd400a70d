"""Parameters annotated with logical axis names, the one way layers and models declare sharded weights."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as linen
import jax.numpy as jnp


def logical_param(module: linen.Module, name: str, init_fn: Callable[..., Any], shape: Sequence[int],
                  axes: Sequence[str | None] | None, dtype: Any = jnp.float32) -> Any:
    """``module.param(name, init_fn, shape, dtype)`` whose value carries the
    logical axis names ``axes`` (one per dimension of ``shape``; ``None``
    leaves it unannotated), which ``lepton_jax.parallel`` rules map to mesh axes."""
    if axes is not None:
        axes = tuple(axes)
        if len(axes) != len(shape):
            raise ValueError(f"{type(module).__name__}: the logical axes of {name!r} must name its "
                             f"{len(shape)} dimensions {tuple(shape)}, got {axes}")
        init_fn = linen.with_logical_partitioning(init_fn, axes)
    # linen.Module.param, not module.param: a layer overriding param() calls this.
    return linen.Module.param(module, name, init_fn, tuple(shape), dtype)
