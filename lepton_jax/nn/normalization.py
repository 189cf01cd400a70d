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


class BatchNorm(linen.Module):
    """Batch normalization over every axis but the last.

    Training (``use_running_average=False``) normalizes with the batch's
    statistics and updates the running ``mean``/``var`` in the
    ``"batch_stats"`` collection (apply with ``mutable=["batch_stats"]``):
    ``running = momentum * running + (1 - momentum) * batch``. Evaluation uses
    the running statistics. With ``axis_name``, batch statistics are averaged
    over that mapped axis (``pmap``/``shard_map`` data parallelism).
    Statistics are fp32 and the variance is the biased (population) one; the
    output has ``x``'s dtype. ``x``: ``[..., C]``, rank >= 2; params ``scale``,
    ``bias``: ``[C]``. Initialization does not touch the running statistics.
    """

    momentum: float = 0.99
    eps: float = 1e-5
    use_running_average: bool | None = None
    axis_name: str | None = None
    param_dtype: Any = jnp.float32

    @linen.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"BatchNorm: momentum must be in [0, 1], got {self.momentum}")
        use_running_average = linen.merge_param("use_running_average", self.use_running_average, use_running_average)
        check_float_input("BatchNorm", x, min_rank=2)
        check_stored_in_features(self, "BatchNorm", x, 0, "features", param="scale")
        features = (x.shape[-1],)
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", linen.initializers.ones_init(), features, self.param_dtype)
        bias = self.param("bias", linen.initializers.zeros_init(), features, self.param_dtype)
        x32 = x.astype(jnp.float32)
        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            sync = self.axis_name is not None and not self.is_initializing()
            # Two passes (mean, then mean squared deviation) rather than
            # E[x^2] - E[x]^2, which cancels catastrophically in fp32 when
            # |mean| >> std. Across devices that is two small pmeans.
            mean = jnp.mean(x32, axis=axes)
            if sync:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if sync:
                var = jax.lax.pmean(var, self.axis_name)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
                running_var.value = self.momentum * running_var.value + (1 - self.momentum) * var
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)
