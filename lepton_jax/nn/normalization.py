"""LayerNorm, RMSNorm (calling ``lepton_jax.ops``) and BatchNorm."""

from __future__ import annotations

from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax.nn._checks import check_float_input, check_stored_in_features
from lepton_jax.ops.normalization import layer_norm, rms_norm


class LayerNorm(linen.Module):
    """Normalizes the last axis: ``ops.layer_norm`` with learned ``scale``/``bias``.

    ``x``: ``[..., D]`` -> same shape and dtype (fp32 statistics); params ``[D]``.
    """

    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    implementation: str = "auto"
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_float_input("LayerNorm", x)
        for param in ("scale", "bias"):
            check_stored_in_features(self, "LayerNorm", x, 0, "features", param=param)
        features = (x.shape[-1],)
        scale = self.param("scale", linen.initializers.ones_init(), features, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", linen.initializers.zeros_init(), features, self.param_dtype) if self.use_bias else None
        return layer_norm(x, scale, bias, eps=self.eps, implementation=self.implementation)


class RMSNorm(linen.Module):
    """Root-mean-square norm of the last axis: ``ops.rms_norm`` with a learned ``scale``.

    ``x``: ``[..., D]`` -> same shape and dtype (fp32 statistics); ``scale``: ``[D]``.
    """

    eps: float = 1e-6
    implementation: str = "auto"
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_float_input("RMSNorm", x)
        check_stored_in_features(self, "RMSNorm", x, 0, "features", param="scale")
        scale = self.param("scale", linen.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, eps=self.eps, implementation=self.implementation)


class BatchNorm(linen.BatchNorm):
    """``flax.linen.BatchNorm``: over every axis but ``axis`` (default the last).

    Training (``use_running_average=False``) normalizes with the batch's
    statistics and updates the running ``mean``/``var`` in the
    ``"batch_stats"`` collection (apply with ``mutable=["batch_stats"]``):
    ``running = momentum * running + (1 - momentum) * batch``. Evaluation uses
    the running statistics. With ``axis_name``, batch statistics are averaged
    over that mapped axis (``pmap``/``shard_map`` data parallelism).
    ``x``: ``[..., C]``, rank >= 2; params ``scale``, ``bias``: ``[C]``.

    Added here: the statistics are fp32 and two-pass (mean, then mean squared
    deviation: ``use_fast_variance=False``, as E[x^2] - E[x]^2 cancels when
    |mean| >> std), the output has ``x``'s dtype (linen promotes to the
    params'), and a bad momentum or input gets an error naming it.
    """

    use_fast_variance: bool = False

    @linen.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask: jax.Array | None = None
                 ) -> jax.Array:
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {self.momentum}")
        check_float_input("BatchNorm", x, min_rank=2)
        if self.axis == -1:
            check_stored_in_features(self, "BatchNorm", x, 0, "features", param="scale")
        return super().__call__(x, use_running_average, mask=mask).astype(self.dtype or x.dtype)
