"""Pallas kernels. ``flash_attention`` takes the public ``[B, S, H, D]`` layout,
pads and transposes for the kernels, and picks the kernel family: the
platform's on GPU/TPU, ``LEPTON_PALLAS_BACKEND`` (gpu|tpu) in interpret mode
on CPU (``ops.dispatch``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lepton_jax.pallas import attention_common, flash_attention_gpu, flash_attention_tpu
from lepton_jax.pallas.attention_common import (
    BLOCK_TABLE,
    AttentionConfig,
    BlockSizes,
    default_block_sizes,
    fit_block,
    round_up,
)
from lepton_jax.ops import dispatch


def flash_attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None, scale=None,
                    block_sizes: BlockSizes | None = None, backend: str | None = None,
                    interpret: bool | None = None, return_lse: bool = False):
    """Flash attention on ``[B, Sq, H, D]`` / ``[B, Skv, K, D]`` inputs (validated
    by ``ops.attention``). Returns ``[B, Sq, H, D]``; with ``return_lse`` also
    each row's log-sum-exp of the scaled scores ``[B, Sq, H]`` fp32 (``-inf``
    for a row that sees no key), differentiable like the output.

    ``backend`` ("gpu"/"tpu") and ``interpret`` default to the platform's;
    forcing ``interpret=False`` on CPU is for lowering to another platform
    (``jax.jit(...).trace(...).lower(lowering_platforms=("tpu",))``).
    """
    target = dispatch.kernel_target(backend, interpret)
    backend, interpret = target.backend, target.interpret
    B, Sq, H, D = q.shape
    Skv, K = k.shape[1], k.shape[2]
    blocks = block_sizes or default_block_sizes(backend, jax.devices()[0].device_kind)
    minimum = 128 if backend == "tpu" and not interpret else 16
    blocks = BlockSizes(
        block_q=fit_block(blocks.block_q, Sq, minimum), block_k=fit_block(blocks.block_k, Skv, minimum),
        block_q_bwd=fit_block(blocks.block_q_bwd, Sq, minimum), block_k_bwd=fit_block(blocks.block_k_bwd, Skv, minimum),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    Sq_pad = round_up(Sq, max(blocks.block_q, blocks.block_q_bwd))
    Skv_pad = round_up(Skv, max(blocks.block_k, blocks.block_k_bwd))
    # Triton tiles are powers of two: head dims such as 80 and 96 are zero-padded
    # (zeros add nothing to q.k and their output columns are dropped).
    D_pad = 1 << (D - 1).bit_length() if backend == "gpu" else D
    config = AttentionConfig(
        causal=causal, scale=1.0 / math.sqrt(D) if scale is None else float(scale), q_len=Sq, kv_len=Skv,
        num_groups=H // K, has_segments=q_segment_ids is not None, blocks=blocks, interpret=interpret)

    def to_kernel(x, seq_pad):
        x = jnp.swapaxes(x, 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, seq_pad - x.shape[2]), (0, D_pad - D)))

    q_k, k_k, v_k = to_kernel(q, Sq_pad), to_kernel(k, Skv_pad), to_kernel(v, Skv_pad)
    q_seg = kv_seg = None
    if config.has_segments:
        # Padded rows/keys get distinct ids; padded keys are masked by length anyway.
        q_seg = jnp.pad(q_segment_ids, ((0, 0), (0, Sq_pad - Sq)), constant_values=-1)
        kv_seg = jnp.pad(kv_segment_ids, ((0, 0), (0, Skv_pad - Skv)), constant_values=-2)
    kernel = flash_attention_gpu.flash_attention if backend == "gpu" else flash_attention_tpu.flash_attention
    out, lse = kernel(q_k, k_k, v_k, q_seg, kv_seg, config)
    out = jnp.swapaxes(out[:, :, :Sq, :D], 1, 2)
    if not return_lse:
        return out
    lse_BxSxH = jnp.swapaxes(lse.reshape(B, H, Sq_pad)[:, :, :Sq], 1, 2)
    # The kernels mark a row without keys +inf (so their backward's p is 0); the public value is -inf.
    return out, jnp.where(lse_BxSxH == jnp.inf, -jnp.inf, lse_BxSxH)


__all__ = ["BLOCK_TABLE", "AttentionConfig", "BlockSizes", "attention_common", "default_block_sizes",
           "flash_attention", "flash_attention_gpu", "flash_attention_tpu"]
