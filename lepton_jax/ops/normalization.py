"""LayerNorm and RMSNorm over the last axis, with an optional fused residual add.

Statistics are computed in fp32; the output has ``x``'s dtype.
``implementation``: ``"xla"`` is the jnp reference below (XLA fuses it);
``"pallas"`` runs the fused kernels of ``lepton_jax.pallas.norm`` (interpret
mode on CPU, family from ``LEPTON_PALLAS_BACKEND``); ``"auto"`` is the
reference until GPU/TPU benchmarks show the kernel ahead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lepton_jax.ops import _checks, dispatch

IMPLEMENTATIONS = ("auto", "xla", "pallas")
AUTO = {"cpu": "xla", "gpu": "xla", "tpu": "xla"}


def _validate(where: str, x, scale, bias, residual, implementation) -> str:
    """Checks the inputs; returns the implementation to run ("auto" is XLA's
    fusion of the reference on every platform: the kernel is opt-in)."""
    implementation = dispatch.choose(where, implementation, IMPLEMENTATIONS, AUTO)
    _checks.check_floating(where, "x", x)
    if jnp.ndim(x) < 1:
        raise ValueError(f"{where}: x must have at least one axis, got shape {jnp.shape(x)}")
    features = x.shape[-1]
    for name, param in (("scale", scale), ("bias", bias)):
        if param is not None and jnp.shape(param) != (features,):
            raise ValueError(f"{where}: {name} must have shape ({features},) (x's last axis), got {jnp.shape(param)}")
    if residual is not None:
        _checks.check_same_shape(where, "x", x, "residual", residual)
        if residual.dtype != x.dtype:
            raise TypeError(f"{where}: residual must have x's dtype {x.dtype}, got {residual.dtype}")
    return implementation


def _pallas_norm(kind, x, scale, bias, eps, residual):
    """Runs the fused kernel on x reshaped to [rows, hidden]."""
    from lepton_jax.pallas import norm as norm_kernels

    hidden = x.shape[-1]
    target = dispatch.kernel_target()
    if scale is None:
        scale = jnp.ones((hidden,), jnp.float32)
    config = norm_kernels.NormConfig(
        kind=kind, eps=float(eps), hidden=hidden, has_residual=residual is not None, has_bias=bias is not None,
        backend=target.backend, interpret=target.interpret)
    rows_x = x.reshape(-1, hidden)
    rows_r = residual.reshape(-1, hidden) if residual is not None else None
    y, h = norm_kernels.fused_norm(rows_x, rows_r, scale, bias, config)
    y = y.reshape(x.shape)
    return (y, h.reshape(x.shape)) if residual is not None else y


def layer_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    *,
    eps: float = 1e-5,
    residual: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis.

    Args:
      x: ``[..., D]`` float. scale, bias: ``[D]`` or None.
      residual: optional ``[..., D]``; then ``h = x + residual`` is normalized
        and ``(layer_norm(h), h)`` is returned (the pre-norm block pattern).
    """
    implementation = _validate("layer_norm", x, scale, bias, residual, implementation)
    if implementation == "pallas":
        return _pallas_norm("layer", x, scale, bias, eps, residual)
    h = x if residual is None else x + residual
    h32 = h.astype(jnp.float32)
    mean = jnp.mean(h32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(h32 - mean), axis=-1, keepdims=True)
    y = (h32 - mean) * jax.lax.rsqrt(var + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    y = y.astype(x.dtype)
    return (y, h) if residual is not None else y


def rms_norm(
    x: jax.Array,
    scale: jax.Array | None,
    *,
    eps: float = 1e-6,
    residual: jax.Array | None = None,
    implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """``x / sqrt(mean(x ** 2) + eps) * scale`` over the last axis.

    Shapes as ``layer_norm``; with ``residual`` returns ``(rms_norm(h), h)``.
    """
    implementation = _validate("rms_norm", x, scale, None, residual, implementation)
    if implementation == "pallas":
        return _pallas_norm("rms", x, scale, None, eps, residual)
    h = x if residual is None else x + residual
    h32 = h.astype(jnp.float32)
    y = h32 * jax.lax.rsqrt(jnp.mean(jnp.square(h32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    y = y.astype(x.dtype)
    return (y, h) if residual is not None else y
