"""Fused LayerNorm / RMSNorm kernels (forward and backward), GPU and TPU.

Unlike attention, one kernel body serves both families: each program works
on 2D ``[rows, hidden]`` tiles with statistics kept as ``[rows, 1]``, which
both the Triton and the Mosaic TPU lowerings accept. What differs per family
is in ``_layout``: Triton tiles must be powers of two (hidden is zero-padded
and masked), Mosaic row tiles multiples of 8.

Forward: one program per row block computes ``h = x (+ residual)``, the fp32
mean and ``rstd`` (the only residuals besides ``h``) and ``y``. Backward: each
program walks several row blocks, writing ``dx`` and accumulating fp32
``dscale``/``dbias`` partial sums, one ``[hidden]`` row per program, summed
afterwards: ``O(programs x hidden)`` instead of ``O(rows x hidden)``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lepton_jax.pallas.attention_common import round_up

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class NormConfig:
    kind: str  # "layer" or "rms"
    eps: float
    hidden: int  # real hidden size; the tiles may be wider (masked)
    has_residual: bool
    has_bias: bool
    backend: str
    interpret: bool
    block_rows: int = 0  # 0: from the layout table
    max_programs: int = 512


def _layout(config: NormConfig, rows: int) -> tuple[int, int, int, int]:
    """``(hidden_pad, block_rows, programs, blocks_per_program)``."""
    if config.backend == "gpu":
        hidden_pad = 1 << (config.hidden - 1).bit_length()
        target_rows, minimum = max(1, 16384 // hidden_pad), 1
    else:
        hidden_pad = config.hidden
        target_rows, minimum = max(8, 65536 // max(hidden_pad, 1)), 8
    block_rows = config.block_rows or min(64, 1 << (target_rows.bit_length() - 1))
    block_rows = max(minimum, min(block_rows, 1 << max(rows - 1, 0).bit_length()))
    if config.backend == "tpu":
        block_rows = round_up(block_rows, 8)
    num_blocks = -(-rows // block_rows)
    programs = min(num_blocks, config.max_programs)
    return hidden_pad, block_rows, programs, -(-num_blocks // programs)


def _normalize(config: NormConfig, h, scale, bias):
    """fp32 ``(y, mean, rstd, xhat)`` of a ``[rows, hidden_pad]`` tile."""
    cols = jax.lax.broadcasted_iota(jnp.int32, h.shape, 1) < config.hidden
    h = jnp.where(cols, h.astype(_F32), 0.0)
    if config.kind == "layer":
        mean = jnp.sum(h, axis=1, keepdims=True) / config.hidden
        centered = jnp.where(cols, h - mean, 0.0)
    else:
        mean = jnp.zeros((h.shape[0], 1), _F32)
        centered = h
    rstd = jax.lax.rsqrt(jnp.sum(centered * centered, axis=1, keepdims=True) / config.hidden + config.eps)
    xhat = centered * rstd
    y = xhat * scale.astype(_F32)
    if bias is not None:
        y = y + bias.astype(_F32)
    return y, mean, rstd, xhat


def _forward_kernel(*refs, config: NormConfig):
    refs = list(refs)
    x_ref = refs.pop(0)
    residual_ref = refs.pop(0) if config.has_residual else None
    scale_ref = refs.pop(0)
    bias_ref = refs.pop(0) if config.has_bias else None
    y_ref = refs.pop(0)
    h_ref = refs.pop(0) if config.has_residual else None
    mean_ref, rstd_ref = refs
    h = x_ref[...]
    if config.has_residual:
        h = (h.astype(_F32) + residual_ref[...].astype(_F32)).astype(h_ref.dtype)
        h_ref[...] = h
    y, mean, rstd, _ = _normalize(config, h, scale_ref[...], bias_ref[...] if config.has_bias else None)
    y_ref[...] = y.astype(y_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _backward_kernel(*refs, config: NormConfig, block_rows: int, blocks_per_program: int):
    refs = list(refs)
    h_ref, scale_ref, mean_ref, rstd_ref, dy_ref = refs[:5]
    refs = refs[5:]
    dh_out_ref = refs.pop(0) if config.has_residual else None
    dx_ref, dscale_ref = refs[:2]
    dbias_ref = refs[2] if config.has_bias else None
    scale = scale_ref[...].astype(_F32)
    width = scale.shape[1]

    def body(i, carry):
        dscale, dbias = carry
        rows = pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows)
        cols = jax.lax.broadcasted_iota(jnp.int32, (block_rows, width), 1) < config.hidden
        h = jnp.where(cols, h_ref[rows, :].astype(_F32), 0.0)
        xhat = jnp.where(cols, (h - mean_ref[rows, :]) * rstd_ref[rows, :], 0.0)
        dy = dy_ref[rows, :].astype(_F32)
        g = dy * scale
        inner = jnp.sum(g * xhat, axis=1, keepdims=True) / config.hidden
        if config.kind == "layer":
            dx = (g - jnp.sum(g, axis=1, keepdims=True) / config.hidden - xhat * inner) * rstd_ref[rows, :]
        else:
            dx = (g - xhat * inner) * rstd_ref[rows, :]
        if config.has_residual:
            dx = dx + dh_out_ref[rows, :].astype(_F32)
        dx_ref[rows, :] = dx.astype(dx_ref.dtype)
        return dscale + jnp.sum(dy * xhat, axis=0, keepdims=True), dbias + jnp.sum(dy, axis=0, keepdims=True)

    zeros = jnp.zeros((1, width), _F32)
    # int32 bounds: under jax_enable_x64 Python ints would make the index int64,
    # which Mosaic cannot multiply with the int32 program ids.
    dscale, dbias = jax.lax.fori_loop(jnp.int32(0), jnp.int32(blocks_per_program), body, (zeros, zeros))
    dscale_ref[...] = dscale
    if config.has_bias:
        dbias_ref[...] = dbias


def _compiler_params(config: NormConfig, num_warps: int = 4):
    if config.interpret:
        return None
    if config.backend == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=num_warps, num_stages=1)
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel",))


def _pad(x, rows, cols):
    return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _forward(x, residual, scale, bias, config: NormConfig):
    """On 2D ``x [rows, hidden]``: ``(y, h, mean, rstd)`` (h is x without residual)."""
    rows = x.shape[0]
    hidden_pad, block_rows, programs, per = _layout(config, rows)
    rows_pad = programs * per * block_rows
    tile = pl.BlockSpec((block_rows, hidden_pad), lambda i: (i, 0))
    vector = pl.BlockSpec((1, hidden_pad), lambda i: (0, 0))
    stat = pl.BlockSpec((block_rows, 1), lambda i: (i, 0))
    args, in_specs = [_pad(x, rows_pad, hidden_pad)], [tile]
    if config.has_residual:
        args.append(_pad(residual, rows_pad, hidden_pad))
        in_specs.append(tile)
    args.append(_pad(scale[None], 1, hidden_pad))
    in_specs.append(vector)
    if config.has_bias:
        args.append(_pad(bias[None], 1, hidden_pad))
        in_specs.append(vector)
    out_shape = [jax.ShapeDtypeStruct((rows_pad, hidden_pad), x.dtype)]
    out_specs = [tile]
    if config.has_residual:
        out_shape.append(jax.ShapeDtypeStruct((rows_pad, hidden_pad), x.dtype))
        out_specs.append(tile)
    out_shape += [jax.ShapeDtypeStruct((rows_pad, 1), _F32)] * 2
    out_specs += [stat, stat]
    outs = pl.pallas_call(
        functools.partial(_forward_kernel, config=config), grid=(rows_pad // block_rows,), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, interpret=config.interpret,
        compiler_params=_compiler_params(config), name=f"lepton_{config.kind}_norm_fwd",
    )(*args)
    y = outs[0][:rows, :config.hidden]
    h = outs[1][:rows, :config.hidden] if config.has_residual else x
    return y, h, outs[-2][:rows], outs[-1][:rows]


def _backward(h, scale, mean, rstd, dy, dh_out, config: NormConfig):
    rows = h.shape[0]
    hidden_pad, block_rows, programs, per = _layout(config, rows)
    rows_pad = programs * per * block_rows
    chunk = pl.BlockSpec((per * block_rows, hidden_pad), lambda p: (p, 0))
    chunk_stat = pl.BlockSpec((per * block_rows, 1), lambda p: (p, 0))
    partial = pl.BlockSpec((None, 1, hidden_pad), lambda p: (p, 0, 0))
    args = [_pad(h, rows_pad, hidden_pad), _pad(scale[None], 1, hidden_pad), _pad(mean, rows_pad, 1),
            _pad(rstd, rows_pad, 1), _pad(dy, rows_pad, hidden_pad)]
    in_specs = [chunk, pl.BlockSpec((1, hidden_pad), lambda p: (0, 0)), chunk_stat, chunk_stat, chunk]
    if config.has_residual:
        args.append(_pad(dh_out, rows_pad, hidden_pad))
        in_specs.append(chunk)
    out_shape = [jax.ShapeDtypeStruct((rows_pad, hidden_pad), h.dtype),
                 jax.ShapeDtypeStruct((programs, 1, hidden_pad), _F32)]
    out_specs = [chunk, partial]
    if config.has_bias:
        out_shape.append(jax.ShapeDtypeStruct((programs, 1, hidden_pad), _F32))
        out_specs.append(partial)
    outs = pl.pallas_call(
        functools.partial(_backward_kernel, config=config, block_rows=block_rows, blocks_per_program=per),
        grid=(programs,), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        interpret=config.interpret, compiler_params=_compiler_params(config),
        name=f"lepton_{config.kind}_norm_bwd",
    )(*args)
    dx = outs[0][:rows, :config.hidden]
    dscale = jnp.sum(outs[1][:, 0, :config.hidden], axis=0)
    dbias = jnp.sum(outs[2][:, 0, :config.hidden], axis=0) if config.has_bias else None
    return dx, dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def fused_norm(x, residual, scale, bias, config: NormConfig):
    """``(y, h)`` for 2D ``x [rows, hidden]``; ``residual``/``bias`` may be None."""
    y, h, _, _ = _forward(x, residual, scale, bias, config)
    return y, h


def _fused_norm_fwd(x, residual, scale, bias, config):
    y, h, mean, rstd = _forward(x, residual, scale, bias, config)
    return (y, h), (h, scale, bias, mean, rstd)


def _fused_norm_bwd(config, saved, cotangents):
    h, scale, bias, mean, rstd = saved
    dy, dh_out = cotangents
    dx, dscale, dbias = _backward(h, scale, mean, rstd, dy, dh_out if config.has_residual else None, config)
    dresidual = dx if config.has_residual else None
    return (dx, dresidual, dscale.astype(scale.dtype), dbias.astype(bias.dtype) if config.has_bias else None)


fused_norm.defvjp(_fused_norm_fwd, _fused_norm_bwd)
