"""Scaled dot-product attention: the public op, its jnp reference and the dispatch.

``attention(q, k, v)`` with q ``[B, Sq, H, D]`` and k, v ``[B, Skv, K, D]``
(``H`` a multiple of ``K``: GQA/MQA). Causal masking is aligned at the end:
query ``i`` sees key ``j`` when ``j <= i + (Skv - Sq)``, so with a KV cache
the last query sees every key. Softmax statistics are fp32; a query that sees
no key (fully masked row) outputs zeros with zero gradients.

Implementations: ``"xla"`` (the reference below), ``"pallas"`` (flash
attention kernels; on CPU they run in interpret mode, the family chosen by
``LEPTON_PALLAS_BACKEND=gpu|tpu``), ``"cudnn"`` (``jax.nn.dot_product_attention``
on NVIDIA GPUs), ``"auto"`` (cuDNN where it can serve on GPU, else the Pallas
kernel; Pallas on TPU; the reference on CPU).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lepton_jax.ops import _checks, dispatch

IMPLEMENTATIONS = ("auto", "xla", "pallas", "cudnn")
# GPU: cuDNN where it serves the inputs, else the flash kernel.
AUTO = {"cpu": "xla", "gpu": "cudnn", "tpu": "pallas"}
SegmentIds = jax.Array | tuple[jax.Array, jax.Array] | None


def _validate(q, k, v, segment_ids, scale):
    where = "attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _checks.check_floating(where, name, x)
        if jnp.ndim(x) != 4:
            raise ValueError(f"{where}: {name} must have rank 4 [batch, seq, heads, head_dim], got shape {jnp.shape(x)}")
    B, Sq, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{where}: k and v must have the same shape, got k {k.shape} and v {v.shape}")
    Bk, Skv, K, Dk = k.shape
    if Bk != B:
        raise ValueError(f"{where}: q has batch {B} but k and v have batch {Bk}")
    if Dk != D:
        raise ValueError(f"{where}: q has head_dim {D} but k has {Dk}")
    if H % K:
        raise ValueError(f"{where}: q heads ({H}) must be a multiple of k/v heads ({K})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{where}: scale must be a Python float or None, got {type(scale).__name__}")
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"{where}: segment_ids must be [batch, seq] or a (q_ids, kv_ids) pair, got {len(segment_ids)} items")
        q_ids, kv_ids = segment_ids
    else:
        if Sq != Skv:
            raise ValueError(
                f"{where}: a single segment_ids array needs q_len == kv_len, got {Sq} and {Skv}; "
                "pass a (q_ids, kv_ids) pair")
        q_ids = kv_ids = segment_ids
    for name, ids, shape in (("q segment_ids", q_ids, (B, Sq)), ("kv segment_ids", kv_ids, (B, Skv))):
        _checks.check_integer(where, name, ids)
        if jnp.shape(ids) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape}, got {jnp.shape(ids)}")
    return q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)


def attention_reference(q, k, v, *, causal: bool = False, q_segment_ids=None, kv_segment_ids=None,
                        scale: float | None = None, return_lse: bool = False):
    """The plain-jnp twin: materialises the ``[B, H, Sq, Skv]`` scores (with
    ``return_lse`` also the rows' log-sum-exp ``[B, Sq, H]``, as ``attention``)."""
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q_BxSxKxGxD = q.reshape(B, Sq, K, H // K, D)
    s_BxKxGxSxT = jnp.einsum("bskgd,btkd->bkgst", q_BxSxKxGxD, k, preferred_element_type=jnp.float32) * scale
    mask_BxSxT = jnp.ones((1, Sq, Skv), bool)
    if causal:
        mask_BxSxT = mask_BxSxT & (jnp.arange(Skv)[None, :] <= jnp.arange(Sq)[:, None] + (Skv - Sq))[None]
    if q_segment_ids is not None:
        mask_BxSxT = mask_BxSxT & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    mask = mask_BxSxT[:, None, None]
    s_BxKxGxSxT = jnp.where(mask, s_BxKxGxSxT, -jnp.inf)
    # The max only stabilises exp; softmax does not depend on it.
    m = jax.lax.stop_gradient(jnp.max(s_BxKxGxSxT, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s_BxKxGxSxT - m)
    denominator = jnp.sum(p, axis=-1, keepdims=True)
    seen = denominator > 0.0
    p = p / jnp.where(seen, denominator, 1.0)
    out_BxSxKxGxD = jnp.einsum("bkgst,btkd->bskgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    out = out_BxSxKxGxD.reshape(B, Sq, H, D).astype(q.dtype)
    if not return_lse:
        return out
    lse_BxKxGxS = jnp.where(seen, m + jnp.log(jnp.where(seen, denominator, 1.0)), -jnp.inf)[..., 0]
    return out, jnp.transpose(lse_BxKxGxS, (0, 3, 1, 2)).reshape(B, Sq, H)


def _cudnn_unsupported(q, k, causal, q_ids) -> str | None:
    """Why cuDNN (through jax.nn.dot_product_attention) cannot serve, or None."""
    if jax.default_backend() != "gpu":
        return f"it needs an NVIDIA GPU, and the default backend is {jax.default_backend()!r}"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN flash attention takes bf16/fp16, got {q.dtype}"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"head_dim must be a multiple of 8 up to 128, got {q.shape[-1]}"
    if q_ids is not None:
        return "segment_ids are not supported by the cuDNN path"
    if causal and q.shape[1] != k.shape[1]:
        return "jax.nn.dot_product_attention aligns causal masks at the start; q_len != kv_len needs end alignment"
    return None


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: SegmentIds = None,
    scale: float | None = None,
    implementation: str = "auto",
    block_sizes=None,
    return_lse: bool = False,
):
    """Softmax attention ``softmax(q k^T * scale) v`` per head.

    Args:
      q: ``[B, Sq, H, D]``; k, v: ``[B, Skv, K, D]`` with ``H % K == 0``.
      causal: mask future keys (aligned at the end, see the module docstring).
      segment_ids: ``[B, S]`` int (when ``Sq == Skv``) or a ``(q_ids [B, Sq],
        kv_ids [B, Skv])`` pair; queries attend only to keys of their segment.
      scale: default ``1 / sqrt(D)``.
      implementation: "auto", "xla", "pallas" or "cudnn".
      block_sizes: a ``lepton_jax.pallas.BlockSizes`` overriding the table.
      return_lse: also return each row's log-sum-exp of the scaled, masked
        scores ``[B, Sq, H]`` fp32 (``-inf`` where a row sees no key),
        differentiable; what merges attention over key blocks computed apart
        (``ops.ring_attention``). The cuDNN path does not give it, so "auto"
        then takes the Pallas kernel.

    Returns ``[B, Sq, H, D]`` in q's dtype (and the lse with ``return_lse``).
    """
    requested = implementation
    implementation = dispatch.choose("attention", implementation, IMPLEMENTATIONS, AUTO)
    q_ids, kv_ids = _validate(q, k, v, segment_ids, scale)
    if requested == "auto" and implementation == "cudnn" and (
            return_lse or _cudnn_unsupported(q, k, causal, q_ids) is not None):
        implementation = "pallas"  # the flash kernel serves what cuDNN's fused attention cannot
    if implementation == "xla":
        return attention_reference(q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=scale,
                                   return_lse=return_lse)
    if implementation == "cudnn":
        reason = _cudnn_unsupported(q, k, causal, q_ids)
        if return_lse:
            reason = "jax.nn.dot_product_attention does not return the log-sum-exp (return_lse=True)"
        if reason is not None:
            raise ValueError(f"attention: implementation='cudnn' cannot serve these inputs: {reason}")
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
    from lepton_jax.pallas import flash_attention

    return flash_attention(q, k, v, causal=causal, q_segment_ids=q_ids, kv_segment_ids=kv_ids, scale=scale,
                           block_sizes=block_sizes, return_lse=return_lse)
