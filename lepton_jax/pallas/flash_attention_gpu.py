"""Flash attention for GPUs: Pallas kernels with the Triton lowering (sm80+).

Forward: one program per (batch, head, q block) streams the k/v blocks with an
online softmax (fp32 statistics) and writes the output and the row
log-sum-exp. Backward: one kernel per (batch, head, kv block) accumulates dk
and dv over the q blocks that can see it, one per (batch, head, q block)
accumulates dq; ``p`` is recomputed from the log-sum-exp, the only residual
besides the inputs and the output. Causal programs skip the blocks the mask
removes entirely.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lepton_jax.pallas.attention_common import AttentionConfig, attention_mask, kv_head, make_flash_attention

_F32 = jnp.float32


def _dot(a, b, trans_b: bool = False):
    dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _dot_t(a, b):
    """``a.T @ b`` for 2D tiles."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=_F32)


def _causal_kv_blocks(config: AttentionConfig, q_block_end, block_k: int, num_kv_blocks: int):
    """How many kv blocks a q block ending (exclusive) at ``q_block_end`` needs."""
    if not config.causal:
        return num_kv_blocks
    last_visible = q_block_end - 1 + config.causal_offset  # the last key the last row sees
    return jnp.clip(last_visible // block_k + 1, 0, num_kv_blocks)


def _forward_kernel(*refs, config: AttentionConfig, block_k: int, num_kv_blocks: int):
    if config.has_segments:
        q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), q_seg_ref, kv_seg_ref = refs, None, None
    block_q, head_dim = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]
    q_seg = q_seg_ref[...][:, None] if config.has_segments else None

    def body(j, carry):
        m_i, l_i, acc = carry
        kv_start = j * block_k
        kv = pl.ds(kv_start, block_k)
        s = _dot(q, k_ref[kv, :], trans_b=True) * config.scale
        kv_seg = kv_seg_ref[kv][None, :] if config.has_segments else None
        mask = attention_mask(config, q_start, kv_start, block_q, block_k, q_seg, kv_seg)
        s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet
        alpha = jnp.exp(m_i - m_safe)
        p = jnp.exp(s - m_safe[:, None])
        l_i = alpha * l_i + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + _dot(p.astype(v_ref.dtype), v_ref[kv, :])
        return m_new, l_i, acc

    init = (jnp.full((block_q,), -jnp.inf, _F32), jnp.zeros((block_q,), _F32), jnp.zeros((block_q, head_dim), _F32))
    upper = _causal_kv_blocks(config, q_start + block_q, block_k, num_kv_blocks)
    m_i, l_i, acc = jax.lax.fori_loop(0, upper, body, init)
    empty = l_i == 0.0  # fully masked row: output 0, lse +inf so backward p is 0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l_i)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m_i + jnp.log(jnp.where(empty, 1.0, l_i)))


def _compiler_params(config: AttentionConfig):
    if config.interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=config.blocks.num_warps, num_stages=config.blocks.num_stages)


def _segment_specs(config, seq_len_q_block, kv_full):
    """Specs for (q_seg [B, Sq], kv_seg [B, Skv]) in a (b, h, i) grid."""
    return [pl.BlockSpec((None, seq_len_q_block), lambda b, h, i: (b, i)),
            pl.BlockSpec((None, kv_full), lambda b, h, i: (b, 0))]


def forward(q, k, v, q_seg, kv_seg, config: AttentionConfig):
    """``(out [B, H, Sq, D], lse [B, H, Sq] fp32)``; sequences padded to the blocks."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    block_q, block_k = config.blocks.block_q, config.blocks.block_k
    G = config.num_groups
    in_specs = [
        pl.BlockSpec((None, None, block_q, D), lambda b, h, i: (b, h, i, 0)),
        pl.BlockSpec((None, None, Skv, D), lambda b, h, i: (b, kv_head(h, G), 0, 0)),
        pl.BlockSpec((None, None, Skv, D), lambda b, h, i: (b, kv_head(h, G), 0, 0)),
    ]
    args = [q, k, v]
    if config.has_segments:
        in_specs += _segment_specs(config, block_q, Skv)
        args += [q_seg, kv_seg]
    kernel = functools.partial(_forward_kernel, config=config, block_k=block_k, num_kv_blocks=Skv // block_k)
    return pl.pallas_call(
        kernel,
        grid=(B, H, Sq // block_q),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, block_q, D), lambda b, h, i: (b, h, i, 0)),
                   pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Sq), _F32)],
        interpret=config.interpret,
        compiler_params=_compiler_params(config),
        name="lepton_flash_attention_fwd",
    )(*args)


def _dkv_kernel(*refs, config: AttentionConfig, block_q: int, num_q_blocks: int):
    if config.has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), q_seg_ref, kv_seg_ref = refs, None, None
    block_k, head_dim = k_ref.shape
    kv_start = pl.program_id(2) * block_k
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...][None, :] if config.has_segments else None

    def body(i, carry):
        dk, dv = carry
        q_start = i * block_q
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = _dot(q, k, trans_b=True) * config.scale
        q_seg = q_seg_ref[rows][:, None] if config.has_segments else None
        mask = attention_mask(config, q_start, kv_start, block_q, block_k, q_seg, kv_seg)
        p = jnp.where(mask, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
        dv = dv + _dot_t(p.astype(do.dtype), do)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta_ref[rows][:, None])
        dk = dk + _dot_t(ds.astype(q.dtype), q)
        return dk, dv

    first = 0
    if config.causal:  # q rows before kv_start - offset see none of this block
        first = jnp.clip((kv_start - config.causal_offset) // block_q, 0, num_q_blocks)
    zeros = jnp.zeros((block_k, head_dim), _F32)
    dk, dv = jax.lax.fori_loop(first, num_q_blocks, body, (zeros, zeros))
    dk_ref[...] = (dk * config.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, config: AttentionConfig, block_k: int, num_kv_blocks: int):
    if config.has_segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_seg_ref, kv_seg_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), q_seg_ref, kv_seg_ref = refs, None, None
    block_q, head_dim = q_ref.shape
    q_start = pl.program_id(2) * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_seg = q_seg_ref[...][:, None] if config.has_segments else None

    def body(j, dq):
        kv_start = j * block_k
        kv = pl.ds(kv_start, block_k)
        k = k_ref[kv, :]
        s = _dot(q, k, trans_b=True) * config.scale
        kv_seg = kv_seg_ref[kv][None, :] if config.has_segments else None
        mask = attention_mask(config, q_start, kv_start, block_q, block_k, q_seg, kv_seg)
        p = jnp.where(mask, jnp.exp(s - lse), 0.0)
        ds = p * (_dot(do, v_ref[kv, :], trans_b=True) - delta)
        return dq + _dot(ds.astype(k.dtype), k)

    upper = _causal_kv_blocks(config, q_start + block_q, block_k, num_kv_blocks)
    dq = jax.lax.fori_loop(0, upper, body, jnp.zeros((block_q, head_dim), _F32))
    dq_ref[...] = (dq * config.scale).astype(dq_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, out, lse, d_out, d_lse, config: AttentionConfig):
    """``(dq [B, H, Sq, D], dk, dv [B, H, Skv, D] per q head)``."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    G = config.num_groups
    block_q, block_k = config.blocks.block_q_bwd, config.blocks.block_k_bwd
    delta = jnp.sum(out.astype(_F32) * d_out.astype(_F32), axis=-1) - d_lse.astype(_F32)  # [B, H, Sq]
    d_out = d_out.astype(q.dtype)
    full_q = pl.BlockSpec((None, None, Sq, D), lambda b, h, j: (b, h, 0, 0))
    full_rows = pl.BlockSpec((None, None, Sq), lambda b, h, j: (b, h, 0))
    kv_block = pl.BlockSpec((None, None, block_k, D), lambda b, h, j: (b, kv_head(h, G), j, 0))
    seg_specs_kv = [pl.BlockSpec((None, Sq), lambda b, h, j: (b, 0)),
                    pl.BlockSpec((None, block_k), lambda b, h, j: (b, j))]
    seg_args = [q_seg, kv_seg] if config.has_segments else []
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, config=config, block_q=block_q, num_q_blocks=Sq // block_q),
        grid=(B, H, Skv // block_k),
        in_specs=[full_q, kv_block, kv_block, full_q, full_rows, full_rows]
        + (seg_specs_kv if config.has_segments else []),
        out_specs=[pl.BlockSpec((None, None, block_k, D), lambda b, h, j: (b, h, j, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((B, H, Skv, D), _F32)] * 2,
        interpret=config.interpret,
        compiler_params=_compiler_params(config),
        name="lepton_flash_attention_dkv",
    )(q, k, v, d_out, lse, delta, *seg_args)

    q_block = pl.BlockSpec((None, None, block_q, D), lambda b, h, i: (b, h, i, 0))
    row_block = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    full_kv = pl.BlockSpec((None, None, Skv, D), lambda b, h, i: (b, kv_head(h, G), 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, config=config, block_k=block_k, num_kv_blocks=Skv // block_k),
        grid=(B, H, Sq // block_q),
        in_specs=[q_block, full_kv, full_kv, q_block, row_block, row_block]
        + (_segment_specs(config, block_q, Skv) if config.has_segments else []),
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=config.interpret,
        compiler_params=_compiler_params(config),
        name="lepton_flash_attention_dq",
    )(q, k, v, d_out, lse, delta, *seg_args)
    return dq, dk, dv


flash_attention = make_flash_attention(forward, backward)
