"""Fused linear + softmax cross-entropy kernels (GPU Triton and TPU Mosaic).

The kernels compute per-token statistics of ``logits = x @ w`` one
``[block_t, block_v]`` tile at a time, never writing the logits:

- forward: the row log-sum-exp, the label's logit and the sum of logits
  (for label smoothing), from which ``ops.linear_cross_entropy`` forms the loss;
- backward: with per-token coefficients ``a`` and ``b`` the tile's logit
  gradient is ``p * a - b * ((1 - eps) [j == label] + eps / V)``; one kernel
  accumulates ``dx = dlogits @ w^T`` over vocab tiles, another
  ``dw = x^T @ dlogits`` over token tiles (both in fp32).

GPU programs loop over the reduction axis in-kernel; TPU grids carry it as
the last ("arbitrary") axis with VMEM accumulators. Padded vocab columns are
masked; padded tokens get zero coefficients.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_F32 = jnp.float32
_LANES = 128


@dataclasses.dataclass(frozen=True)
class CEConfig:
    vocab: int  # real vocabulary; tiles beyond it are masked
    eps: float  # label smoothing
    backend: str
    interpret: bool
    block_t: int = 64
    block_v: int = 128


def _dot(a, b, contract_a=1, contract_b=0):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=_F32)


def _columns(shape, v_start):
    return v_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


def _dlogits(config, logits, cols, labels, lse, a, b):
    """The logit gradient of a tile; ``labels``, ``lse``, ``a``, ``b`` are ``[rows, 1]``."""
    valid = cols < config.vocab
    p = jnp.where(valid, jnp.exp(logits - lse), 0.0)
    target = jnp.where(cols == labels, 1.0 - config.eps, 0.0) + jnp.where(valid, config.eps / config.vocab, 0.0)
    return p * a - target * b


def _tile_stats(config, logits, cols, labels):
    valid = cols < config.vocab
    masked = jnp.where(valid, logits, -jnp.inf)
    tile_max = jnp.max(masked, axis=1, keepdims=True)
    label_logit = jnp.sum(jnp.where(cols == labels, logits, 0.0), axis=1, keepdims=True)
    logit_sum = jnp.sum(jnp.where(valid, logits, 0.0), axis=1, keepdims=True)
    return masked, tile_max, label_logit, logit_sum


# ---------------------------------------------------------------- GPU (Triton)

def _gpu_forward_kernel(x_ref, w_ref, labels_ref, lse_ref, label_ref, sum_ref, *, config, num_v_blocks):
    x = x_ref[...]
    labels = labels_ref[...]
    rows, bv = x.shape[0], config.block_v

    def body(j, carry):
        m, l, label_logit, logit_sum = carry
        v_start = j * bv
        logits = _dot(x, w_ref[:, pl.ds(v_start, bv)])
        cols = _columns(logits.shape, v_start)
        masked, tile_max, tile_label, tile_sum = _tile_stats(config, logits, cols, labels)
        m_new = jnp.maximum(m, tile_max)
        l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(masked - m_new), axis=1, keepdims=True)
        return m_new, l, label_logit + tile_label, logit_sum + tile_sum

    init = (jnp.full((rows, 1), -jnp.inf, _F32),) + tuple(jnp.zeros((rows, 1), _F32) for _ in range(3))
    m, l, label_logit, logit_sum = jax.lax.fori_loop(0, num_v_blocks, body, init)
    lse_ref[...] = m + jnp.log(l)
    label_ref[...] = label_logit
    sum_ref[...] = logit_sum


def _gpu_dx_kernel(x_ref, w_ref, labels_ref, lse_ref, a_ref, b_ref, dx_ref, *, config, num_v_blocks):
    x = x_ref[...]
    labels, lse, a, b = labels_ref[...], lse_ref[...], a_ref[...], b_ref[...]
    bv = config.block_v

    def body(j, dx):
        v_start = j * bv
        w = w_ref[:, pl.ds(v_start, bv)]
        logits = _dot(x, w)
        d = _dlogits(config, logits, _columns(logits.shape, v_start), labels, lse, a, b)
        return dx + _dot(d.astype(w.dtype), w, 1, 1)

    dx_ref[...] = jax.lax.fori_loop(0, num_v_blocks, body, jnp.zeros(x.shape, _F32)).astype(dx_ref.dtype)


def _gpu_dw_kernel(x_ref, w_ref, labels_ref, lse_ref, a_ref, b_ref, dw_ref, *, config, num_t_blocks):
    w = w_ref[...]
    bt = config.block_t
    v_start = pl.program_id(0) * config.block_v

    def body(i, dw):
        rows = pl.ds(i * bt, bt)
        x = x_ref[rows, :]
        logits = _dot(x, w)
        d = _dlogits(config, logits, _columns(logits.shape, v_start), labels_ref[rows, :], lse_ref[rows, :],
                     a_ref[rows, :], b_ref[rows, :])
        return dw + _dot(x, d.astype(x.dtype), 0, 0)

    dw_ref[...] = jax.lax.fori_loop(0, num_t_blocks, body, jnp.zeros(w.shape, _F32)).astype(dw_ref.dtype)


def _gpu_params(config, num_warps=4):
    if config.interpret:
        return None
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=2)


def _gpu_forward(x, w, labels, config):
    T, H = x.shape
    V = w.shape[1]
    bt = config.block_t
    row = lambda i: (i, 0)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_gpu_forward_kernel, config=config, num_v_blocks=V // config.block_v),
        grid=(T // bt,),
        in_specs=[pl.BlockSpec((bt, H), row), pl.BlockSpec((H, V), lambda i: (0, 0)), pl.BlockSpec((bt, 1), row)],
        out_specs=[pl.BlockSpec((bt, 1), row)] * 3,
        out_shape=[jax.ShapeDtypeStruct((T, 1), _F32)] * 3,
        interpret=config.interpret, compiler_params=_gpu_params(config), name="lepton_linear_ce_fwd",
    )(x, w, labels)


def _gpu_backward(x, w, labels, lse, a, b, config):
    T, H = x.shape
    V = w.shape[1]
    bt, bv = config.block_t, config.block_v
    row = lambda i: (i, 0)  # noqa: E731
    per_token = [pl.BlockSpec((bt, 1), row)] * 4
    dx = pl.pallas_call(
        functools.partial(_gpu_dx_kernel, config=config, num_v_blocks=V // bv),
        grid=(T // bt,),
        in_specs=[pl.BlockSpec((bt, H), row), pl.BlockSpec((H, V), lambda i: (0, 0)), *per_token],
        out_specs=pl.BlockSpec((bt, H), row), out_shape=jax.ShapeDtypeStruct((T, H), x.dtype),
        interpret=config.interpret, compiler_params=_gpu_params(config), name="lepton_linear_ce_dx",
    )(x, w, labels, lse, a, b)
    whole = lambda j: (0, 0)  # noqa: E731
    dw = pl.pallas_call(
        functools.partial(_gpu_dw_kernel, config=config, num_t_blocks=T // bt),
        grid=(V // bv,),
        in_specs=[pl.BlockSpec((T, H), whole), pl.BlockSpec((H, bv), lambda j: (0, j)),
                  *[pl.BlockSpec((T, 1), whole)] * 4],
        out_specs=pl.BlockSpec((H, bv), lambda j: (0, j)), out_shape=jax.ShapeDtypeStruct((H, V), w.dtype),
        interpret=config.interpret, compiler_params=_gpu_params(config), name="lepton_linear_ce_dw",
    )(x, w, labels, lse, a, b)
    return dx, dw


# ------------------------------------------------------------ TPU (Mosaic)

def _tpu_forward_kernel(x_ref, w_ref, labels_ref, lse_ref, label_ref, sum_ref, m_sc, l_sc, label_sc, sum_sc, *,
                        config):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, _F32)
        for ref in (l_sc, label_sc, sum_sc):
            ref[...] = jnp.zeros(ref.shape, _F32)

    logits = _dot(x_ref[...], w_ref[...])
    cols = _columns(logits.shape, j * config.block_v)
    masked, tile_max, tile_label, tile_sum = _tile_stats(config, logits, cols, labels_ref[...])
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, tile_max)
    l_sc[...] = l_sc[...] * jnp.exp(m_prev - m_new) + jnp.sum(jnp.exp(masked - m_new[:, :1]), axis=1, keepdims=True)
    m_sc[...] = m_new
    label_sc[...] += tile_label
    sum_sc[...] += tile_sum

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        lse_ref[...] = m_sc[...][:, :1] + jnp.log(l_sc[...][:, :1])
        label_ref[...] = label_sc[...][:, :1]
        sum_ref[...] = sum_sc[...][:, :1]


def _tpu_dx_kernel(x_ref, w_ref, labels_ref, lse_ref, a_ref, b_ref, dx_ref, dx_sc, *, config):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dx_sc[...] = jnp.zeros(dx_sc.shape, _F32)

    w = w_ref[...]
    logits = _dot(x_ref[...], w)
    d = _dlogits(config, logits, _columns(logits.shape, j * config.block_v), labels_ref[...], lse_ref[...],
                 a_ref[...], b_ref[...])
    dx_sc[...] += _dot(d.astype(w.dtype), w, 1, 1)

    @pl.when(j == pl.num_programs(1) - 1)
    def _finish():
        dx_ref[...] = dx_sc[...].astype(dx_ref.dtype)


def _tpu_dw_kernel(x_ref, w_ref, labels_ref, lse_ref, a_ref, b_ref, dw_ref, dw_sc, *, config):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        dw_sc[...] = jnp.zeros(dw_sc.shape, _F32)

    x = x_ref[...]
    logits = _dot(x, w_ref[...])
    d = _dlogits(config, logits, _columns(logits.shape, j * config.block_v), labels_ref[...], lse_ref[...],
                 a_ref[...], b_ref[...])
    dw_sc[...] += _dot(x, d.astype(x.dtype), 0, 0)

    @pl.when(i == pl.num_programs(1) - 1)
    def _finish():
        dw_ref[...] = dw_sc[...].astype(dw_ref.dtype)


def _tpu_params():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _tpu_forward(x, w, labels, config):
    from jax.experimental.pallas import tpu as pltpu

    T, H = x.shape
    V = w.shape[1]
    bt, bv = config.block_t, config.block_v
    token = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    return pl.pallas_call(
        functools.partial(_tpu_forward_kernel, config=config),
        grid=(T // bt, V // bv),
        in_specs=[pl.BlockSpec((bt, H), lambda i, j: (i, 0)), pl.BlockSpec((H, bv), lambda i, j: (0, j)), token],
        out_specs=[token] * 3, out_shape=[jax.ShapeDtypeStruct((T, 1), _F32)] * 3,
        scratch_shapes=[pltpu.VMEM((bt, _LANES), _F32)] * 4,
        interpret=config.interpret, compiler_params=_tpu_params(), name="lepton_linear_ce_fwd_tpu",
    )(x, w, labels)


def _tpu_backward(x, w, labels, lse, a, b, config):
    from jax.experimental.pallas import tpu as pltpu

    T, H = x.shape
    V = w.shape[1]
    bt, bv = config.block_t, config.block_v
    token = pl.BlockSpec((bt, 1), lambda i, j: (i, 0))
    dx = pl.pallas_call(
        functools.partial(_tpu_dx_kernel, config=config),
        grid=(T // bt, V // bv),
        in_specs=[pl.BlockSpec((bt, H), lambda i, j: (i, 0)), pl.BlockSpec((H, bv), lambda i, j: (0, j)),
                  *[token] * 4],
        out_specs=pl.BlockSpec((bt, H), lambda i, j: (i, 0)), out_shape=jax.ShapeDtypeStruct((T, H), x.dtype),
        scratch_shapes=[pltpu.VMEM((bt, H), _F32)],
        interpret=config.interpret, compiler_params=_tpu_params(), name="lepton_linear_ce_dx_tpu",
    )(x, w, labels, lse, a, b)
    token_t = pl.BlockSpec((bt, 1), lambda j, i: (i, 0))
    dw = pl.pallas_call(
        functools.partial(_tpu_dw_kernel, config=config),
        grid=(V // bv, T // bt),
        in_specs=[pl.BlockSpec((bt, H), lambda j, i: (i, 0)), pl.BlockSpec((H, bv), lambda j, i: (0, j)),
                  *[token_t] * 4],
        out_specs=pl.BlockSpec((H, bv), lambda j, i: (0, j)), out_shape=jax.ShapeDtypeStruct((H, V), w.dtype),
        scratch_shapes=[pltpu.VMEM((H, bv), _F32)],
        interpret=config.interpret, compiler_params=_tpu_params(), name="lepton_linear_ce_dw_tpu",
    )(x, w, labels, lse, a, b)
    return dx, dw


# ------------------------------------------------------------ custom_vjp

def token_statistics(x, w, labels, config: CEConfig):
    """``(lse, label_logit, logit_sum)``, each ``[T, 1]`` fp32; inputs padded to the blocks."""
    forward = _gpu_forward if config.backend == "gpu" else _tpu_forward
    return forward(x, w, labels, config)


def token_gradients(x, w, labels, lse, a, b, config: CEConfig):
    """``(dx [T, H], dw [H, V])`` for per-token coefficients ``a``, ``b`` ``[T, 1]``."""
    backward = _gpu_backward if config.backend == "gpu" else _tpu_backward
    return backward(x, w, labels, lse, a, b, config)
