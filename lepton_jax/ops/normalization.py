"""LayerNorm and RMSNorm over the last axis, with an optional fused residual add.

Statistics are computed in fp32; the output has ``x``'s dtype. These are the
reference (``"xla"``) implementations; Pallas kernels plug in behind the same
``implementation=`` argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lepton_jax.ops import _checks

IMPLEMENTATIONS = ("auto", "xla")


def _prepare(where: str, x, scale, bias, residual, implementation):
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{where}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _checks.check_floating(where, "x", x)
    if jnp.ndim(x) < 1:
        raise ValueError(f"{where}: x must have at least one axis, got shape {jnp.shape(x)}")
    features = x.shape[-1]
    for name, param in (("scale", scale), ("bias", bias)):
        if param is not None and jnp.shape(param) != (features,):
            raise ValueError(f"{where}: {name} must have shape ({features},) (x's last axis), got {jnp.shape(param)}")
    if residual is not None:
        _checks.check_same_shape(where, "x", x, "residual", residual)
        x = x + residual.astype(x.dtype)
    return x


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
    h = _prepare("layer_norm", x, scale, bias, residual, implementation)
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
    h = _prepare("rms_norm", x, scale, None, residual, implementation)
    h32 = h.astype(jnp.float32)
    y = h32 * jax.lax.rsqrt(jnp.mean(jnp.square(h32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    y = y.astype(x.dtype)
    return (y, h) if residual is not None else y
