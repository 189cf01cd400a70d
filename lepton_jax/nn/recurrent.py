"""LSTM and GRU layers: a ``lax.scan`` over time with masks for variable lengths.

Both take ``x_BxTxF`` and return ``(outputs_BxTxH, final_carry)``. Given
``lengths`` ``[B]`` (or ``mask`` ``[B, T]``), the carry stops changing after
each sequence's last valid step, so ``final_carry`` is the state there, and
outputs at invalid steps are 0. The input projection of every step is one
matmul before the scan; only the recurrent matmul runs inside it. All
parameters are created before the scan and closed over, so a plain
``jax.lax.scan`` works with ``init``/``apply``/``jit`` (no lifted transform).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax.nn._checks import check_float_input

Carry = Any


def _time_mask(where: str, x_BxTxF: jax.Array, lengths: jax.Array | None,
               mask: jax.Array | None) -> jax.Array | None:
    """The ``[B, T]`` validity of each step, or None when every step is valid."""
    check_float_input(where, x_BxTxF)
    if x_BxTxF.ndim != 3:
        raise ValueError(f"{where}: x must have rank 3 [batch, time, features], got shape {x_BxTxF.shape}")
    B, T, _ = x_BxTxF.shape
    if lengths is not None and mask is not None:
        raise ValueError(f"{where}: give lengths or mask, not both")
    if lengths is not None:
        if not jnp.issubdtype(jnp.asarray(lengths).dtype, jnp.integer):
            raise TypeError(f"{where}: lengths must be an integer array, got dtype {jnp.asarray(lengths).dtype}")
        if jnp.shape(lengths) != (B,):
            raise ValueError(f"{where}: lengths must have shape ({B},), got {jnp.shape(lengths)}")
        return jnp.arange(T)[None, :] < lengths[:, None]
    if mask is not None:
        if jnp.shape(mask) != (B, T):
            raise ValueError(f"{where}: mask must have shape ({B}, {T}), got {jnp.shape(mask)}")
        return mask.astype(bool)
    return None


def _initial_carry(where: str, initial_carry: Carry | None, zeros: Carry) -> Carry:
    if initial_carry is None:
        return zeros
    expected, got = jax.tree.map(jnp.shape, zeros), jax.tree.map(jnp.shape, initial_carry)
    if got != expected:
        raise ValueError(f"{where}: initial_carry must have shapes {expected}, got {got}")
    return jax.tree.map(lambda c, z: c.astype(z.dtype), initial_carry, zeros)


def _scan(step: Callable, carry: Carry, inputs_BxTxG: jax.Array, valid_BxT: jax.Array | None, reverse: bool):
    """Runs ``step(carry, inputs_BxG) -> (carry, out_BxH)`` over time, holding
    the carry and zeroing the output where a step is invalid."""
    if valid_BxT is None:  # every step valid: no selects in the loop
        carry, outputs_TxBxH = jax.lax.scan(step, carry, jnp.swapaxes(inputs_BxTxG, 0, 1), reverse=reverse)
        return jnp.swapaxes(outputs_TxBxH, 0, 1), carry

    def body(carry, xs):
        inputs_BxG, valid_B = xs
        new_carry, out_BxH = step(carry, inputs_BxG)
        keep = valid_B[:, None]
        new_carry = jax.tree.map(lambda new, old: jnp.where(keep, new, old), new_carry, carry)
        return new_carry, jnp.where(keep, out_BxH, jnp.zeros_like(out_BxH))

    xs = (jnp.swapaxes(inputs_BxTxG, 0, 1), jnp.swapaxes(valid_BxT, 0, 1))
    carry, outputs_TxBxH = jax.lax.scan(body, carry, xs, reverse=reverse)
    return jnp.swapaxes(outputs_TxBxH, 0, 1), carry


def _kernels(module: linen.Module, x_BxTxF: jax.Array, gates: int) -> tuple[jax.Array, jax.Array]:
    """The input kernel ``[F, gates*H]`` and the recurrent kernel ``[H, gates*H]``
    (one ``recurrent_init`` block per gate) of an LSTM or GRU layer."""
    F, H = x_BxTxF.shape[-1], module.features
    w_in = module.param("input_kernel", module.kernel_init, (F, gates * H))
    w_rec = module.param("recurrent_kernel", lambda k, s: jnp.concatenate(
        [module.recurrent_init(kk, (H, H)) for kk in jax.random.split(k, gates)], axis=1), (H, gates * H))
    return w_in, w_rec


class _RecurrentLayer(linen.Module):
    """The fields LSTM and GRU share."""

    features: int
    reverse: bool = False
    kernel_init: Callable[..., jax.Array] = linen.initializers.lecun_normal()
    recurrent_init: Callable[..., jax.Array] = linen.initializers.orthogonal()


class LSTM(_RecurrentLayer):
    """Long short-term memory layer (gates i, f, g, o).

    ``c' = f * c + i * g``, ``h' = o * tanh(c')``; the forget-gate bias starts
    at ``forget_bias``. Carry: ``(c_BxH, h_BxH)``, zeros unless
    ``initial_carry`` is given. ``reverse=True`` reads each sequence from its
    last valid step back to its first.
    """

    forget_bias: float = 1.0

    @linen.compact
    def __call__(self, x_BxTxF: jax.Array, *, lengths: jax.Array | None = None, mask: jax.Array | None = None,
                 initial_carry: Carry | None = None) -> tuple[jax.Array, Carry]:
        valid_BxT = _time_mask("LSTM", x_BxTxF, lengths, mask)
        B, H = x_BxTxF.shape[0], self.features
        w_in_Fx4H, w_rec_Hx4H = _kernels(self, x_BxTxF, 4)
        bias_4H = self.param("bias", lambda k, s: jnp.zeros(s).at[H:2 * H].set(self.forget_bias), (4 * H,))
        gates_in_BxTx4H = x_BxTxF @ w_in_Fx4H + bias_4H

        def step(carry, gates_in_Bx4H):
            c_BxH, h_BxH = carry
            i, f, g, o = jnp.split(gates_in_Bx4H + h_BxH @ w_rec_Hx4H, 4, axis=-1)
            c_BxH = jax.nn.sigmoid(f) * c_BxH + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_BxH = jax.nn.sigmoid(o) * jnp.tanh(c_BxH)
            return (c_BxH, h_BxH), h_BxH

        zeros_BxH = jnp.zeros((B, H), gates_in_BxTx4H.dtype)
        carry = _initial_carry("LSTM", initial_carry, (zeros_BxH, zeros_BxH))
        return _scan(step, carry, gates_in_BxTx4H, valid_BxT, self.reverse)


class GRU(_RecurrentLayer):
    """Gated recurrent unit layer (the cuDNN/PyTorch form, reset gate applied
    after the recurrent matmul).

    ``r = σ(x W_ir + b_ir + h W_hr + b_hr)``, ``z`` likewise,
    ``n = tanh(x W_in + b_in + r * (h W_hn + b_hn))``, ``h' = (1 - z) n + z h``.
    Carry: ``h_BxH``.
    """

    @linen.compact
    def __call__(self, x_BxTxF: jax.Array, *, lengths: jax.Array | None = None, mask: jax.Array | None = None,
                 initial_carry: Carry | None = None) -> tuple[jax.Array, Carry]:
        valid_BxT = _time_mask("GRU", x_BxTxF, lengths, mask)
        B, H = x_BxTxF.shape[0], self.features
        w_in_Fx3H, w_rec_Hx3H = _kernels(self, x_BxTxF, 3)
        b_in_3H = self.param("input_bias", linen.initializers.zeros_init(), (3 * H,))
        b_rec_3H = self.param("recurrent_bias", linen.initializers.zeros_init(), (3 * H,))
        gates_in_BxTx3H = x_BxTxF @ w_in_Fx3H + b_in_3H

        def step(h_BxH, gates_in_Bx3H):
            x_r, x_z, x_n = jnp.split(gates_in_Bx3H, 3, axis=-1)
            h_r, h_z, h_n = jnp.split(h_BxH @ w_rec_Hx3H + b_rec_3H, 3, axis=-1)
            r = jax.nn.sigmoid(x_r + h_r)
            z = jax.nn.sigmoid(x_z + h_z)
            n = jnp.tanh(x_n + r * h_n)
            h_BxH = (1.0 - z) * n + z * h_BxH
            return h_BxH, h_BxH

        carry = _initial_carry("GRU", initial_carry, jnp.zeros((B, H), gates_in_BxTx3H.dtype))
        return _scan(step, carry, gates_in_BxTx3H, valid_BxT, self.reverse)


class Bidirectional(linen.Module):
    """Runs ``forward`` (``reverse=False``) and ``backward`` (``reverse=True``)
    recurrent layers over the same sequence and concatenates their outputs.

    ``x_BxTxF`` -> ``(outputs_BxTx(Hf+Hb), (forward_carry, backward_carry))``;
    ``lengths``/``mask`` go to both, so the backward layer starts at each
    sequence's last valid step.
    """

    forward: linen.Module
    backward: linen.Module

    def __call__(self, x_BxTxF: jax.Array, *, lengths: jax.Array | None = None,
                 mask: jax.Array | None = None) -> tuple[jax.Array, tuple[Carry, Carry]]:
        for name, layer, expected in (("forward", self.forward, False), ("backward", self.backward, True)):
            if getattr(layer, "reverse", None) is not expected:
                raise ValueError(f"Bidirectional: {name} must be a recurrent layer with reverse={expected}, "
                                 f"got {type(layer).__name__} with reverse={getattr(layer, 'reverse', None)}")
        out_fwd_BxTxH, carry_fwd = self.forward(x_BxTxF, lengths=lengths, mask=mask)
        out_bwd_BxTxH, carry_bwd = self.backward(x_BxTxF, lengths=lengths, mask=mask)
        return jnp.concatenate([out_fwd_BxTxH, out_bwd_BxTxH], axis=-1), (carry_fwd, carry_bwd)
