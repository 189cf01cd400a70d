"""Linear + softmax cross-entropy without the full ``[tokens, vocab]`` logits.

``linear_cross_entropy(x, w, labels)`` is the loss of ``softmax(x @ w)``.
Implementations:

- ``"xla"``: the twin: ``x @ w`` materialised in fp32, then log-softmax.
- ``"chunked"``: a ``custom_vjp`` that scans over token chunks: each chunk's
  logits ``[chunk, vocab]`` exist only inside one scan step, the backward
  recomputes them from the saved per-token log-sum-exp and accumulates
  ``dw`` in fp32, so peak memory is ``O(chunk x vocab + hidden x vocab)``
  instead of ``O(tokens x vocab)``. The matmuls stay XLA's.
- ``"pallas"``: the fused kernels of ``lepton_jax.pallas.linear_cross_entropy``
  (interpret mode on CPU, family from ``LEPTON_PALLAS_BACKEND``): logits exist
  only as tiles; the backward recomputes them.
- ``"auto"``: the reference on CPU, ``"chunked"`` on GPU/TPU (until GPU
  benchmarks show the kernels ahead).

Per token: ``loss = lse - (1 - eps) * logit[label] - eps * mean(logits)
+ z_loss * lse**2`` (label smoothing ``eps`` as optax's ``smooth_labels``),
0 where ``label == ignore_index``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lepton_jax.ops import _checks, dispatch

IMPLEMENTATIONS = ("auto", "xla", "chunked", "pallas")
AUTO = {"cpu": "xla", "gpu": "chunked", "tpu": "chunked"}
_F32 = jnp.float32


def _validate(x, w, labels, label_smoothing, z_loss, reduction, implementation) -> str:
    where = "linear_cross_entropy"
    implementation = dispatch.choose(where, implementation, IMPLEMENTATIONS, AUTO)
    _checks.check_floating(where, "x", x)
    _checks.check_floating(where, "w", w)
    _checks.check_integer(where, "labels", labels)
    if jnp.ndim(x) != 2:
        raise ValueError(f"{where}: x must have rank 2 [tokens, hidden], got shape {jnp.shape(x)}")
    if jnp.ndim(w) != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(f"{where}: w must have shape [hidden={x.shape[1]}, vocab], got {jnp.shape(w)}")
    if jnp.shape(labels) != (x.shape[0],):
        raise ValueError(f"{where}: labels must have shape ({x.shape[0]},) (x's tokens), got {jnp.shape(labels)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{where}: label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"{where}: z_loss must be >= 0, got {z_loss}")
    if reduction not in _checks.REDUCTIONS:
        raise ValueError(f"{where}: reduction must be one of {_checks.REDUCTIONS}, got {reduction!r}")
    return implementation


def _token_losses_from_logits(logits_TxV, labels_T, valid_T, eps, z_loss):
    """Per-token loss and lse from fp32 logits (shared by both implementations)."""
    lse_T = jax.nn.logsumexp(logits_TxV, axis=-1)
    safe_T = jnp.where(valid_T, labels_T, 0)
    label_logit_T = jnp.take_along_axis(logits_TxV, safe_T[:, None], axis=-1)[:, 0]
    loss_T = lse_T - (1.0 - eps) * label_logit_T - eps * jnp.mean(logits_TxV, axis=-1) + z_loss * lse_T ** 2
    return jnp.where(valid_T, loss_T, 0.0), lse_T


def _reference_token_losses(x, w, labels, ignore_index, eps, z_loss):
    logits_TxV = jnp.dot(x, w, preferred_element_type=_F32)
    return _token_losses_from_logits(logits_TxV, labels, labels != ignore_index, eps, z_loss)[0]


@dataclasses.dataclass(frozen=True)
class _ChunkConfig:
    chunk: int
    ignore_index: int
    eps: float
    z_loss: float


def _chunks(x, labels, config):
    """Pads tokens to a multiple of the chunk (padding is ignored) and splits."""
    T, H = x.shape
    pad = -T % config.chunk
    x = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, config.chunk, H)
    labels = jnp.pad(labels, (0, pad), constant_values=config.ignore_index).reshape(-1, config.chunk)
    return x, labels


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_token_losses(x, w, labels, config: _ChunkConfig):
    return _chunked_forward(x, w, labels, config)[0]


def _chunked_forward(x, w, labels, config):
    T = x.shape[0]
    x_NxCxH, labels_NxC = _chunks(x, labels, config)

    def step(_, inputs):
        x_CxH, labels_C = inputs
        logits_CxV = jnp.dot(x_CxH, w, preferred_element_type=_F32)
        loss_C, lse_C = _token_losses_from_logits(
            logits_CxV, labels_C, labels_C != config.ignore_index, config.eps, config.z_loss)
        return None, (loss_C, lse_C)

    _, (loss_NxC, lse_NxC) = jax.lax.scan(step, None, (x_NxCxH, labels_NxC))
    return loss_NxC.reshape(-1)[:T], lse_NxC.reshape(-1)


def _chunked_fwd(x, w, labels, config):
    loss_T, lse = _chunked_forward(x, w, labels, config)
    return loss_T, (x, w, labels, lse)


def _chunked_bwd(config, saved, g_T):
    x, w, labels, lse = saved
    T = x.shape[0]
    V = w.shape[1]
    x_NxCxH, labels_NxC = _chunks(x, labels, config)
    g_NxC = jnp.pad(g_T.astype(_F32), (0, -T % config.chunk)).reshape(-1, config.chunk)
    lse_NxC = lse.reshape(-1, config.chunk)

    def step(dw_HxV, inputs):
        x_CxH, labels_C, g_C, lse_C = inputs
        valid_C = labels_C != config.ignore_index
        logits_CxV = jnp.dot(x_CxH, w, preferred_element_type=_F32)
        # One elementwise expression (no one-hot array), so XLA fuses it into
        # a single [chunk, vocab] buffer in w's dtype.
        is_label = jax.lax.broadcasted_iota(jnp.int32, logits_CxV.shape, 1) == labels_C[:, None]
        coeff_C = (1.0 + 2.0 * config.z_loss * lse_C)
        g_valid_C = jnp.where(valid_C, g_C, 0.0)
        d_logits = ((jnp.exp(logits_CxV - lse_C[:, None]) * coeff_C[:, None]
                     - jnp.where(is_label, 1.0 - config.eps, 0.0) - config.eps / V)
                    * g_valid_C[:, None]).astype(w.dtype)
        dx_CxH = jnp.dot(d_logits, w.T, preferred_element_type=_F32)
        dw_HxV = dw_HxV + jnp.dot(x_CxH.T, d_logits.astype(x.dtype), preferred_element_type=_F32)
        return dw_HxV, dx_CxH

    dw, dx_NxCxH = jax.lax.scan(step, jnp.zeros(w.shape, _F32), (x_NxCxH, labels_NxC, g_NxC, lse_NxC))
    dx = dx_NxCxH.reshape(-1, x.shape[1])[:T].astype(x.dtype)
    return dx, dw.astype(w.dtype), None


_chunked_token_losses.defvjp(_chunked_fwd, _chunked_bwd)


@dataclasses.dataclass(frozen=True)
class _KernelConfig:
    tokens: int
    ignore_index: int
    eps: float
    z_loss: float
    kernel: object  # pallas.linear_cross_entropy.CEConfig


def _kernel_inputs(x, w, labels, config: _KernelConfig):
    """Pads to the blocks; ignored and padded tokens get label -1 (matches no column)."""
    k = config.kernel
    T, H = x.shape
    H_pad = 1 << max(4, (H - 1).bit_length()) if k.backend == "gpu" else H
    T_pad = -(-T // k.block_t) * k.block_t
    V_pad = -(-k.vocab // k.block_v) * k.block_v
    valid = labels != config.ignore_index
    x_p = jnp.pad(x, ((0, T_pad - T), (0, H_pad - H)))
    w_p = jnp.pad(w, ((0, H_pad - H), (0, V_pad - k.vocab)))
    labels_p = jnp.pad(jnp.where(valid, labels, -1), (0, T_pad - T), constant_values=-1)[:, None]
    return x_p, w_p, labels_p, jnp.pad(valid, (0, T_pad - T))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _pallas_token_losses(x, w, labels, config: _KernelConfig):
    return _pallas_forward(x, w, labels, config)[0]


def _pallas_forward(x, w, labels, config):
    from lepton_jax.pallas import linear_cross_entropy as kernels

    x_p, w_p, labels_p, valid = _kernel_inputs(x, w, labels, config)
    lse, label_logit, logit_sum = kernels.token_statistics(x_p, w_p, labels_p, config.kernel)
    loss = (lse - (1.0 - config.eps) * label_logit - config.eps * logit_sum / config.kernel.vocab
            + config.z_loss * lse ** 2)
    return jnp.where(valid, loss, 0.0)[:config.tokens, 0], lse


def _pallas_fwd(x, w, labels, config):
    loss_T, lse = _pallas_forward(x, w, labels, config)
    return loss_T, (x, w, labels, lse)


def _pallas_bwd(config, saved, g_T):
    from lepton_jax.pallas import linear_cross_entropy as kernels

    x, w, labels, lse = saved
    x_p, w_p, labels_p, valid = _kernel_inputs(x, w, labels, config)
    g = jnp.pad(g_T.astype(_F32), (0, x_p.shape[0] - config.tokens))[:, None]
    b = jnp.where(valid, g, 0.0)
    a = b * (1.0 + 2.0 * config.z_loss * lse)
    dx, dw = kernels.token_gradients(x_p, w_p, labels_p, lse, a, b, config.kernel)
    return dx[:config.tokens, :x.shape[1]], dw[:w.shape[0], :config.kernel.vocab], None


_pallas_token_losses.defvjp(_pallas_fwd, _pallas_bwd)


def _pallas_config(x, w, ignore_index, eps, z_loss) -> _KernelConfig:
    from lepton_jax.pallas import linear_cross_entropy as kernels
    from lepton_jax.pallas.attention_common import fit_block

    target = dispatch.kernel_target()
    backend, interpret = target.backend, target.interpret
    minimum_t, minimum_v = (16, 16) if interpret or backend == "gpu" else (8, 128)
    kernel = kernels.CEConfig(
        vocab=w.shape[1], eps=float(eps), backend=backend, interpret=interpret,
        block_t=fit_block(64, x.shape[0], minimum_t), block_v=fit_block(128, w.shape[1], minimum_v))
    return _KernelConfig(tokens=x.shape[0], ignore_index=ignore_index, eps=float(eps), z_loss=float(z_loss),
                         kernel=kernel)


def default_chunk(vocab: int, budget_elements: int = 1 << 25) -> int:
    """Tokens per chunk so one chunk's fp32 logits hold about ``budget_elements``
    (32M: 128 MB); a power of two between 128 and 4096."""
    chunk = max(128, min(4096, budget_elements // max(vocab, 1)))
    return 1 << (chunk.bit_length() - 1)


def linear_cross_entropy(
    x: jax.Array,
    w: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    implementation: str = "auto",
    chunk_size: int | None = None,
) -> jax.Array:
    """Cross-entropy of ``softmax(x @ w)`` against integer ``labels``.

    Args:
      x: ``[tokens, hidden]`` float. w: ``[hidden, vocab]`` float.
      labels: ``[tokens]`` integer; ``ignore_index`` tokens contribute 0.
      label_smoothing, z_loss: see the module docstring.
      reduction: "mean" over the counted tokens (0 when none), "sum", or
        "none" (``[tokens]`` fp32).
      implementation: "auto", "xla", "chunked" or "pallas".
      chunk_size: tokens per chunk for "chunked" (default ``default_chunk``).

    Gradients flow to ``x`` and ``w``.
    """
    implementation = _validate(x, w, labels, label_smoothing, z_loss, reduction, implementation)
    if implementation == "xla":
        loss_T = _reference_token_losses(x, w, labels, ignore_index, label_smoothing, z_loss)
    elif implementation == "pallas":
        config = _pallas_config(x, w, ignore_index, label_smoothing, z_loss)
        loss_T = _pallas_token_losses(x, w, labels.astype(jnp.int32), config)
    else:
        chunk = chunk_size or default_chunk(w.shape[1])
        chunk = min(chunk, max(1, x.shape[0]))
        config = _ChunkConfig(chunk=chunk, ignore_index=ignore_index, eps=float(label_smoothing), z_loss=float(z_loss))
        loss_T = _chunked_token_losses(x, w, labels.astype(jnp.int32), config)
    valid_T = (labels != ignore_index).astype(_F32)
    return _checks.reduce("linear_cross_entropy", loss_T, reduction, weights=valid_T)
