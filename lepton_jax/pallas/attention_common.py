"""What the flash-attention kernels share: block sizes, the mask, padding and
the ``custom_vjp`` wiring. The kernels themselves live in
``flash_attention_gpu.py`` (Triton lowering) and ``flash_attention_tpu.py``
(Mosaic TPU).

Kernel layout: q ``[B, H, Sq, D]``, k/v ``[B, K, Skv, D]`` (heads before
sequence), sequences padded to block multiples; the real lengths travel in
``AttentionConfig`` and padded keys are masked, so nothing past the end is
read as data. Causal masking is aligned at the end: query ``i`` sees key ``j``
when ``j <= i + (kv_len - q_len)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the forward and backward kernels (rows of q / of k-v)."""

    block_q: int = 128
    block_k: int = 64
    block_q_bwd: int = 64
    block_k_bwd: int = 64
    num_warps: int = 4
    num_stages: int = 2


# Per backend and device kind; the first matching key prefix wins, "" is the default.
BLOCK_TABLE: dict[str, dict[str, BlockSizes]] = {
    "gpu": {
        "NVIDIA H100": BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=8,
                                  num_stages=3),
        "NVIDIA A100": BlockSizes(block_q=128, block_k=64, block_q_bwd=64, block_k_bwd=64, num_warps=4,
                                  num_stages=2),
        "": BlockSizes(),
    },
    "tpu": {"": BlockSizes(block_q=128, block_k=128, block_q_bwd=128, block_k_bwd=128)},
}


def default_block_sizes(backend: str, device_kind: str = "") -> BlockSizes:
    """The table's block sizes for ``backend`` on a device of ``device_kind``."""
    table = BLOCK_TABLE[backend]
    for prefix, sizes in table.items():
        if prefix and device_kind.startswith(prefix):
            return sizes
    return table[""]


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Static facts a kernel needs (hashable: a ``custom_vjp`` nondiff arg)."""

    causal: bool
    scale: float
    q_len: int
    kv_len: int
    num_groups: int  # q heads per kv head
    has_segments: bool
    blocks: BlockSizes
    interpret: bool

    @property
    def causal_offset(self) -> int:
        return self.kv_len - self.q_len


def attention_mask(config: AttentionConfig, q_start, kv_start, rows: int, cols: int,
                   q_seg=None, kv_seg=None) -> jax.Array:
    """``[rows, cols]`` bool: which (query, key) pairs of a tile may attend.

    ``q_seg`` is ``[rows, 1]`` and ``kv_seg`` ``[1, cols]`` when segments are used.
    """
    q_pos = q_start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    kv_pos = kv_start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    mask = kv_pos < config.kv_len
    if config.causal:
        mask = mask & (kv_pos <= q_pos + config.causal_offset)
    if config.has_segments:
        mask = mask & (q_seg == kv_seg)
    return mask


def kv_head(h: jax.Array, groups: int) -> jax.Array:
    """The key/value head of query head ``h`` (a grid index) with ``groups``
    query heads per kv head. Truncating division in ``h``'s own dtype: ``//``
    would lower through ``sign`` (which Mosaic resolves against the TPU it
    runs on), and a Python int divisor becomes int64 under ``jax_enable_x64``."""
    return jax.lax.div(h, h.dtype.type(groups))


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def fit_block(block: int, length: int, minimum: int = 16) -> int:
    """Shrinks a block to the smallest power of two covering ``length`` (at
    least ``minimum``), so short sequences do not pad to a full block."""
    covering = max(minimum, 1 << max(length - 1, 0).bit_length())
    return min(block, covering)


FwdFn = Callable[..., tuple[jax.Array, jax.Array]]
BwdFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def make_flash_attention(forward: FwdFn, backward: BwdFn):
    """Wires kernels into ``attend(q, k, v, q_seg, kv_seg, config) -> (out, lse)``
    with a ``custom_vjp`` whose residuals are the inputs, the output and the
    per-row log-sum-exp.

    ``forward(q, k, v, q_seg, kv_seg, config) -> (out, lse)`` and
    ``backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, config) -> (dq, dk, dv)``
    with dk/dv per q head ``[B, H, Skv, D]``; GQA sums them here. The lse is
    differentiable too (ring attention merges blocks by it): since
    ``d lse_i / d s_ij = p_ij``, its cotangent only shifts the backward's
    ``delta_i = sum_d o_id do_id`` to ``delta_i - d_lse_i``.
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def attend(q, k, v, q_seg, kv_seg, config):
        return forward(q, k, v, q_seg, kv_seg, config)

    def attend_fwd(q, k, v, q_seg, kv_seg, config):
        out, lse = forward(q, k, v, q_seg, kv_seg, config)
        return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)

    def attend_bwd(config, residuals, cotangents):
        q, k, v, q_seg, kv_seg, out, lse = residuals
        d_out, d_lse = cotangents
        dq, dk_per_head, dv_per_head = backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, config)
        B, K, S, D = k.shape
        dk = dk_per_head.reshape(B, K, config.num_groups, S, D).sum(2).astype(k.dtype)
        dv = dv_per_head.reshape(B, K, config.num_groups, S, D).sum(2).astype(v.dtype)
        return dq.astype(q.dtype), dk, dv, None, None

    attend.defvjp(attend_fwd, attend_bwd)
    return attend
