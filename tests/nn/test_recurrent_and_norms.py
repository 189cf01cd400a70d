"""LSTM/GRU against numpy loops (with variable lengths), norm layers, BatchNorm stats."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lepton_jax import nn

KEY = jax.random.PRNGKey(0)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_lstm(x, lengths, p, reverse=False):
    B, T, _ = x.shape
    H = p["recurrent_kernel"].shape[0]
    c, h = np.zeros((B, H)), np.zeros((B, H))
    out = np.zeros((B, T, H))
    for b in range(B):
        steps = range(lengths[b])
        for t in (reversed(steps) if reverse else steps):
            z = x[b, t] @ p["input_kernel"] + h[b] @ p["recurrent_kernel"] + p["bias"]
            i, f, g, o = np.split(z, 4)
            c[b] = _sigmoid(f) * c[b] + _sigmoid(i) * np.tanh(g)
            h[b] = _sigmoid(o) * np.tanh(c[b])
            out[b, t] = h[b]
    return out, (c, h)


def _np_gru(x, lengths, p):
    B, T, _ = x.shape
    H = p["recurrent_kernel"].shape[0]
    h = np.zeros((B, H))
    out = np.zeros((B, T, H))
    for b in range(B):
        for t in range(lengths[b]):
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
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    ref_out, (ref_c, ref_h) = _np_lstm(x.astype(np.float64), lengths, p, reverse)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(c, ref_c, rtol=1e-4, atol=1e-5)
    # The mask form gives the same result; the forget-gate bias starts at 1.
    mask = np.arange(6)[None] < lengths[:, None]
    np.testing.assert_allclose(lstm.apply(variables, x, mask=mask)[0], out, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(variables["params"]["bias"])[5:10], 1.0)


def test_gru_matches_numpy_and_has_gradients():
    x = np.random.default_rng(1).normal(size=(2, 5, 3)).astype(np.float32)
    lengths = np.array([5, 3], np.int32)
    gru = nn.GRU(4)
    variables = gru.init(KEY, x)
    variables = jax.tree.map(lambda a: a + 0.1, variables)  # non-zero biases too
    out, h = gru.apply(variables, x, lengths=lengths)
    ref_out, ref_h = _np_gru(x.astype(np.float64), lengths, jax.tree.map(np.asarray, variables["params"]))
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-4, atol=1e-5)
    check_grads(lambda v, x: gru.apply(v, x, lengths=lengths)[0], (variables, jnp.asarray(x)), order=1,
                modes=("rev",), atol=1e-2, rtol=1e-2)


def test_recurrent_errors():
    with pytest.raises(ValueError, match=r"LSTM: x must have rank 3 \[batch, time, features\], got shape \(2, 5\)"):
        nn.LSTM(4).init(KEY, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"GRU: lengths must have shape \(2,\), got \(3,\)"):
        nn.GRU(4).init(KEY, jnp.ones((2, 5, 3)), lengths=jnp.ones(3, jnp.int32))
    with pytest.raises(TypeError, match="GRU: lengths must be an integer array, got dtype float32"):
        nn.GRU(4).init(KEY, jnp.ones((2, 5, 3)), lengths=jnp.ones(2))


def test_layer_norm_and_rms_norm_modules():
    x = jax.random.normal(KEY, (2, 3, 8)) * 4 + 2
    variables = nn.LayerNorm().init(KEY, x)
    variables = {"params": {"scale": jnp.linspace(0.5, 2, 8), "bias": jnp.linspace(-1, 1, 8)}}
    y = nn.LayerNorm().apply(variables, x)
    xn = np.asarray(x, np.float64)
    ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, ref * np.linspace(0.5, 2, 8) + np.linspace(-1, 1, 8), rtol=1e-4, atol=1e-4)
    rms = nn.RMSNorm()
    rv = rms.init(KEY, x)
    np.testing.assert_allclose(rms.apply(rv, x), xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6),
                               rtol=1e-4, atol=1e-4)
    assert nn.RMSNorm().apply(rv, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_batch_norm_training_and_running_statistics():
    x = jax.random.normal(KEY, (16, 3, 4)) * 2 + 5
    bn = nn.BatchNorm(momentum=0.9)
    variables = bn.init(KEY, x, use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)  # init leaves stats untouched
    y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * xn.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * xn.var(0), rtol=1e-5)
    # Evaluation normalizes with the running statistics.
    state = {**variables, **updates}
    y_eval = bn.apply(state, x, use_running_average=True)
    mean, var = np.asarray(updates["batch_stats"]["mean"]), np.asarray(updates["batch_stats"]["var"])
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 4), (xn - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-4, atol=1e-4)


def test_batch_norm_axis_name_averages_across_devices():
    x = jax.random.normal(KEY, (2, 8, 3)) + jnp.array([[[0.0]], [[4.0]]])  # two "devices", different means
    bn = nn.BatchNorm(axis_name="devices")
    variables = bn.init(KEY, x[0], use_running_average=False)
    y, _ = jax.vmap(lambda xi: bn.apply(variables, xi, use_running_average=False, mutable=["batch_stats"]),
                    axis_name="devices")(x)
    xn = np.asarray(x, np.float64).reshape(-1, 3)
    ref = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), ref, rtol=1e-4, atol=1e-4)
