"""LSTM, GRU and Bidirectional against numpy loops of the cell equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lepton_jax import nn

KEY = jax.random.key(0)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_params(variables):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])


def _np_lstm(x, lengths, p, reverse=False, carry=None):
    """Each sequence runs over its own valid steps only; outputs elsewhere stay 0."""
    B, T, _ = x.shape
    H = p["recurrent_kernel"].shape[0]
    c, h = (np.zeros((B, H)), np.zeros((B, H))) if carry is None else (np.array(carry[0]), np.array(carry[1]))
    out = np.zeros((B, T, H))
    for b in range(B):
        steps = range(lengths[b])
        for t in (reversed(steps) if reverse else steps):
            i, f, g, o = np.split(x[b, t] @ p["input_kernel"] + h[b] @ p["recurrent_kernel"] + p["bias"], 4)
            c[b] = _sigmoid(f) * c[b] + _sigmoid(i) * np.tanh(g)
            h[b] = _sigmoid(o) * np.tanh(c[b])
            out[b, t] = h[b]
    return out, (c, h)


def _np_gru(x, lengths, p, reverse=False):
    B, T, _ = x.shape
    H = p["recurrent_kernel"].shape[0]
    h = np.zeros((B, H))
    out = np.zeros((B, T, H))
    for b in range(B):
        steps = range(lengths[b])
        for t in (reversed(steps) if reverse else steps):
            xr, xz, xn = np.split(x[b, t] @ p["input_kernel"] + p["input_bias"], 3)
            hr, hz, hn = np.split(h[b] @ p["recurrent_kernel"] + p["recurrent_bias"], 3)
            r, z = _sigmoid(xr + hr), _sigmoid(xz + hz)
            n = np.tanh(xn + r * hn)
            h[b] = (1 - z) * n + z * h[b]
            out[b, t] = h[b]
    return out, h


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_matches_numpy_with_variable_lengths(reverse):
    x = np.random.default_rng(0).normal(size=(3, 6, 4)).astype(np.float32)
    lengths = np.array([6, 2, 4], np.int32)
    lstm = nn.LSTM(5, reverse=reverse)
    variables = lstm.init(KEY, x)
    out, (c, h) = jax.jit(lambda v, x, l: lstm.apply(v, x, lengths=l))(variables, x, lengths)
    ref_out, (ref_c, ref_h) = _np_lstm(x.astype(np.float64), lengths, _np_params(variables), reverse)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c, ref_c, rtol=1e-4, atol=1e-5)
    # The mask form gives the same result; the forget-gate bias starts at 1.
    mask = np.arange(6)[None] < lengths[:, None]
    np.testing.assert_allclose(lstm.apply(variables, x, mask=mask)[0], out, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(variables["params"]["bias"]), np.repeat([0.0, 1.0, 0.0, 0.0], 5))


def test_lstm_full_length_and_initial_carry():
    x = np.random.default_rng(3).normal(size=(2, 4, 3)).astype(np.float32)
    lstm = nn.LSTM(2)
    variables = lstm.init(KEY, x)
    carry = (np.full((2, 2), 0.5, np.float32), np.full((2, 2), -0.3, np.float32))
    out, (c, h) = lstm.apply(variables, x, initial_carry=carry)
    ref_out, (ref_c, ref_h) = _np_lstm(x.astype(np.float64), [4, 4], _np_params(variables), carry=carry)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c, ref_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[:, -1], h)


@pytest.mark.parametrize("reverse", [False, True])
def test_gru_matches_numpy_with_variable_lengths(reverse):
    x = np.random.default_rng(1).normal(size=(3, 5, 3)).astype(np.float32)
    lengths = np.array([5, 3, 1], np.int32)
    gru = nn.GRU(4, reverse=reverse)
    variables = jax.tree.map(lambda a: a + 0.1, gru.init(KEY, x))  # non-zero biases too
    out, h = gru.apply(variables, x, lengths=lengths)
    ref_out, ref_h = _np_gru(x.astype(np.float64), lengths, _np_params(variables), reverse)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-4, atol=1e-5)


def test_recurrent_gradients():
    x = jax.random.normal(KEY, (2, 4, 3))
    lengths = jnp.array([4, 2])
    for layer in (nn.LSTM(3), nn.GRU(3)):
        variables = layer.init(KEY, x)
        # jit: check_grads evaluates the function several times; compile the scan once.
        check_grads(jax.jit(lambda v, x: layer.apply(v, x, lengths=lengths)[0]), (variables, x), order=1,
                    modes=("rev",), atol=1e-2, rtol=1e-2)


def test_bidirectional_concatenates_forward_and_backward():
    x = np.random.default_rng(4).normal(size=(2, 5, 3)).astype(np.float32)
    lengths = np.array([5, 3], np.int32)
    bi = nn.Bidirectional(nn.LSTM(4), nn.GRU(2, reverse=True))
    variables = bi.init(KEY, x, lengths=lengths)
    out, ((c, h), h_bwd) = bi.apply(variables, x, lengths=lengths)
    assert out.shape == (2, 5, 6)
    p = _np_params(variables)
    ref_fwd, (_, ref_h) = _np_lstm(x.astype(np.float64), lengths, p["forward"])
    ref_bwd, ref_h_bwd = _np_gru(x.astype(np.float64), lengths, p["backward"], reverse=True)
    np.testing.assert_allclose(out, np.concatenate([ref_fwd, ref_bwd], -1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h_bwd, ref_h_bwd, rtol=1e-4, atol=1e-5)


def test_recurrent_errors():
    with pytest.raises(ValueError, match=r"LSTM: x must have rank 3 \[batch, time, features\], got shape \(2, 5\)"):
        nn.LSTM(4).init(KEY, jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="GRU: x must be floating point, got dtype int32"):
        nn.GRU(4).init(KEY, jnp.ones((2, 5, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"GRU: lengths must have shape \(2,\), got \(3,\)"):
        nn.GRU(4).init(KEY, jnp.ones((2, 5, 3)), lengths=jnp.ones(3, jnp.int32))
    with pytest.raises(TypeError, match="GRU: lengths must be an integer array, got dtype float32"):
        nn.GRU(4).init(KEY, jnp.ones((2, 5, 3)), lengths=jnp.ones(2))
    with pytest.raises(ValueError, match=r"LSTM: mask must have shape \(2, 5\), got \(2, 4\)"):
        nn.LSTM(4).init(KEY, jnp.ones((2, 5, 3)), mask=jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"LSTM: initial_carry must have shapes \(\(2, 4\), \(2, 4\)\), got"):
        nn.LSTM(4).init(KEY, jnp.ones((2, 5, 3)), initial_carry=(jnp.ones((2, 3)), jnp.ones((2, 3))))
    with pytest.raises(ValueError, match="Bidirectional: backward must be a recurrent layer with reverse=True"):
        nn.Bidirectional(nn.LSTM(4), nn.LSTM(4)).init(KEY, jnp.ones((2, 5, 3)))
