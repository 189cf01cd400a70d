"""Flash attention for TPUs: Pallas Mosaic TPU kernels.

The grid's last axis is the reduction ("arbitrary"): forward and dq walk kv
blocks for a fixed q block, dk/dv walk q blocks for a fixed kv block, keeping
running statistics and accumulators in VMEM scratch, initialised on the first
step and written on the last. Row statistics are kept lane-replicated
(``[rows, 128]``) as Mosaic prefers, and tiles the causal mask removes are
skipped. Segment ids enter as ``[B, Sq, 1]`` and ``[B, 1, Skv]`` so their
blocks satisfy Mosaic's tiling rules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lepton_jax.pallas.attention_common import AttentionConfig, attention_mask, kv_head, make_flash_attention

_F32 = jnp.float32
_LANES = 128


def _dot(a, b, contract_a: int = 1, contract_b: int = 0):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=_F32)


def _tile_visible(config: AttentionConfig, q_start, block_q, kv_start):
    """False when the causal mask removes the whole tile."""
    if not config.causal:
        return True
    return kv_start <= q_start + block_q - 1 + config.causal_offset


def _split_refs(refs, config, n_in):
    inputs, rest = refs[:n_in], refs[n_in:]
    if config.has_segments:
        return inputs, rest[0], rest[1], rest[2:]
    return inputs, None, None, rest


def _tile_mask(config, q_start, kv_start, block_q, block_k, q_seg_ref, kv_seg_ref):
    q_seg = q_seg_ref[...] if config.has_segments else None  # [block_q, 1]
    kv_seg = kv_seg_ref[...] if config.has_segments else None  # [1, block_k]
    return attention_mask(config, q_start, kv_start, block_q, block_k, q_seg, kv_seg)


def _forward_kernel(*refs, config: AttentionConfig):
    (q_ref, k_ref, v_ref), q_seg_ref, kv_seg_ref, (o_ref, lse_ref, m_sc, l_sc, acc_sc) = _split_refs(refs, config, 3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)
    q_start, kv_start = i * block_q, j * block_k

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
        l_sc[...] = jnp.zeros(l_sc.shape, _F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, _F32)

    @pl.when(_tile_visible(config, q_start, block_q, kv_start))
    def _step():
        s = _dot(q_ref[...], k_ref[...], 1, 1) * config.scale
        mask = _tile_mask(config, q_start, kv_start, block_q, block_k, q_seg_ref, kv_seg_ref)
        s = jnp.where(mask, s, -jnp.inf)
        m_prev = m_sc[...]  # [block_q, 128], lanes equal
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[:, :1])
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        m_sc[...] = m_new
        acc_sc[...] = alpha[:, :1] * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...])

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l_i = l_sc[...][:, :1]
        empty = l_i == 0.0  # fully masked row: output 0, lse +inf so backward p is 0
        o_ref[...] = (acc_sc[...] / jnp.where(empty, 1.0, l_i)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m_sc[...][:, :1] + jnp.log(jnp.where(empty, 1.0, l_i)))


def _compiler_params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _segment_args(config, q_seg, kv_seg):
    if not config.has_segments:
        return []
    return [q_seg[:, :, None], kv_seg[:, None, :]]


def _segment_specs(config, block_q, block_k, q_index, kv_index):
    if not config.has_segments:
        return []
    return [pl.BlockSpec((None, block_q, 1), q_index), pl.BlockSpec((None, 1, block_k), kv_index)]


def forward(q, k, v, q_seg, kv_seg, config: AttentionConfig):
    """``(out [B, H, Sq, D], lse [B, H, Sq, 1] fp32)``."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    block_q, block_k, G = config.blocks.block_q, config.blocks.block_k, config.num_groups
    q_spec = pl.BlockSpec((None, None, block_q, D), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, D), lambda b, h, i, j: (b, kv_head(h, G), j, 0))
    seg_specs = _segment_specs(config, block_q, block_k, lambda b, h, i, j: (b, i, 0), lambda b, h, i, j: (b, 0, j))
    return pl.pallas_call(
        functools.partial(_forward_kernel, config=config),
        grid=(B, H, Sq // block_q, Skv // block_k),
        in_specs=[q_spec, kv_spec, kv_spec, *seg_specs],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j: (b, h, i, 0))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Sq, 1), _F32)],
        scratch_shapes=[pltpu.VMEM((block_q, _LANES), _F32), pltpu.VMEM((block_q, _LANES), _F32),
                        pltpu.VMEM((block_q, D), _F32)],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=config.interpret,
        name="lepton_flash_attention_fwd_tpu",
    )(q, k, v, *_segment_args(config, q_seg, kv_seg))


def _dkv_kernel(*refs, config: AttentionConfig):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), q_seg_ref, kv_seg_ref, (dk_ref, dv_ref, dk_sc, dv_sc) = \
        _split_refs(refs, config, 6)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    j, i = pl.program_id(2), pl.program_id(3)
    q_start, kv_start = i * block_q, j * block_k

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, _F32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, _F32)

    @pl.when(_tile_visible(config, q_start, block_q, kv_start))
    def _step():
        q, do = q_ref[...], do_ref[...]
        s = _dot(q, k_ref[...], 1, 1) * config.scale
        mask = _tile_mask(config, q_start, kv_start, block_q, block_k, q_seg_ref, kv_seg_ref)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        dv_sc[...] += _dot(p.astype(do.dtype), do, 0, 0)
        ds = p * (_dot(do, v_ref[...], 1, 1) - delta_ref[...])
        dk_sc[...] += _dot(ds.astype(q.dtype), q, 0, 0)

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * config.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, config: AttentionConfig):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), q_seg_ref, kv_seg_ref, (dq_ref, dq_sc) = \
        _split_refs(refs, config, 6)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)
    q_start, kv_start = i * block_q, j * block_k

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, _F32)

    @pl.when(_tile_visible(config, q_start, block_q, kv_start))
    def _step():
        k = k_ref[...]
        s = _dot(q_ref[...], k, 1, 1) * config.scale
        mask = _tile_mask(config, q_start, kv_start, block_q, block_k, q_seg_ref, kv_seg_ref)
        p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
        ds = p * (_dot(do_ref[...], v_ref[...], 1, 1) - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * config.scale).astype(dq_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, config: AttentionConfig):
    """``(dq [B, H, Sq, D], dk, dv [B, H, Skv, D] per q head)``."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    block_q, block_k, G = config.blocks.block_q_bwd, config.blocks.block_k_bwd, config.num_groups
    delta = jnp.sum(out.astype(_F32) * d_out.astype(_F32), axis=-1, keepdims=True) - d_lse.astype(_F32)  # [B, H, Sq, 1]
    d_out = d_out.astype(q.dtype)
    seg_args = _segment_args(config, q_seg, kv_seg)

    # dk, dv: grid (b, h, kv block j, q block i), i is the reduction.
    q_spec = pl.BlockSpec((None, None, block_q, D), lambda b, h, j, i: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, block_q, 1), lambda b, h, j, i: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, D), lambda b, h, j, i: (b, kv_head(h, G), j, 0))
    dkv_spec = pl.BlockSpec((None, None, block_k, D), lambda b, h, j, i: (b, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, config=config),
        grid=(B, H, Skv // block_k, Sq // block_q),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                  *_segment_specs(config, block_q, block_k, lambda b, h, j, i: (b, i, 0),
                                  lambda b, h, j, i: (b, 0, j))],
        out_specs=[dkv_spec, dkv_spec],
        out_shape=[jax.ShapeDtypeStruct((B, H, Skv, D), _F32)] * 2,
        scratch_shapes=[pltpu.VMEM((block_k, D), _F32), pltpu.VMEM((block_k, D), _F32)],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=config.interpret,
        name="lepton_flash_attention_dkv_tpu",
    )(q, k, v, d_out, lse, delta, *seg_args)

    # dq: grid (b, h, q block i, kv block j), j is the reduction.
    q_spec = pl.BlockSpec((None, None, block_q, D), lambda b, h, i, j: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, block_k, D), lambda b, h, i, j: (b, kv_head(h, G), j, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, config=config),
        grid=(B, H, Sq // block_q, Skv // block_k),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                  *_segment_specs(config, block_q, block_k, lambda b, h, i, j: (b, i, 0),
                                  lambda b, h, i, j: (b, 0, j))],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((block_q, D), _F32)],
        compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=config.interpret,
        name="lepton_flash_attention_dq_tpu",
    )(q, k, v, d_out, lse, delta, *seg_args)
    return dq, dk, dv


flash_attention = make_flash_attention(forward, backward)
