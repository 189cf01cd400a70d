"""LayerNorm, RMSNorm and BatchNorm modules against numpy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lepton_jax import nn

KEY = jax.random.key(0)


def _np_layer_norm(x, eps):
    x = np.asarray(x, np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def test_layer_norm_module_matches_numpy():
    x = jax.random.normal(KEY, (2, 3, 8)) * 4 + 2
    variables = nn.LayerNorm().init(KEY, x)
    assert jax.tree.map(jnp.shape, variables["params"]) == {"scale": (8,), "bias": (8,)}
    np.testing.assert_allclose(nn.LayerNorm().apply(variables, x), _np_layer_norm(x, 1e-5), rtol=1e-4, atol=1e-4)
    scale, bias = np.linspace(0.5, 2, 8), np.linspace(-1, 1, 8)
    variables = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    y = nn.LayerNorm(eps=1e-3).apply(variables, x)
    np.testing.assert_allclose(y, _np_layer_norm(x, 1e-3) * scale + bias, rtol=1e-4, atol=1e-4)
    assert "params" not in nn.LayerNorm(use_scale=False, use_bias=False).init(KEY, x)
    check_grads(jax.jit(lambda v, x: nn.LayerNorm().apply(v, x)), (variables, x), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)


def test_rms_norm_module_matches_numpy_and_keeps_bf16():
    x = jax.random.normal(KEY, (2, 3, 8)) * 4 + 2
    rms = nn.RMSNorm()
    variables = {"params": {"scale": jnp.linspace(0.5, 2, 8)}}
    xn = np.asarray(x, np.float64)
    expected = xn / np.sqrt((xn ** 2).mean(-1, keepdims=True) + 1e-6) * np.linspace(0.5, 2, 8)
    np.testing.assert_allclose(rms.apply(variables, x), expected, rtol=1e-4, atol=1e-4)
    x_bf16 = x.astype(jnp.bfloat16)
    y = rms.apply(variables, x_bf16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2e-2, atol=2e-2)
    y = nn.LayerNorm().apply(nn.LayerNorm().init(KEY, x_bf16), x_bf16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), _np_layer_norm(np.asarray(x_bf16, np.float32), 1e-5),
                               rtol=2e-2, atol=2e-2)
    check_grads(jax.jit(lambda v, x: rms.apply(v, x)), (variables, x), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_batch_norm_training_and_running_statistics():
    x = jax.random.normal(KEY, (16, 3, 4)) * 2 + 5
    bn = nn.BatchNorm(momentum=0.9)
    variables = bn.init(KEY, x, use_running_average=False)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)  # init leaves stats untouched
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
    y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64).reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 4), (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * xn.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * xn.var(0), rtol=1e-5)
    # A second step: running = m^2 * init + m (1 - m) batch1 + (1 - m) batch2.
    x2 = np.asarray(x) * 0.5 - 1
    state = {**variables, **updates}
    _, updates2 = bn.apply(state, x2, use_running_average=False, mutable=["batch_stats"])
    x2n = x2.astype(np.float64).reshape(-1, 4)
    np.testing.assert_allclose(updates2["batch_stats"]["mean"], 0.09 * xn.mean(0) + 0.1 * x2n.mean(0), rtol=1e-5)
    np.testing.assert_allclose(updates2["batch_stats"]["var"], 0.81 + 0.09 * xn.var(0) + 0.1 * x2n.var(0),
                               rtol=1e-5)
    # Evaluation normalizes with the running statistics and needs nothing mutable.
    y_eval = nn.BatchNorm(use_running_average=True).apply(state, x)
    mean, var = np.asarray(updates["batch_stats"]["mean"]), np.asarray(updates["batch_stats"]["var"])
    np.testing.assert_allclose(np.asarray(y_eval).reshape(-1, 4), (xn - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-4, atol=1e-4)


def test_batch_norm_variance_with_large_mean_and_bf16():
    x = jax.random.normal(KEY, (64, 4)) + 3000.0  # E[x^2] - E[x]^2 would lose the variance in fp32
    _, updates = nn.BatchNorm(momentum=0.0).apply(
        nn.BatchNorm().init(KEY, x, use_running_average=False), x, use_running_average=False, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["var"], np.asarray(x, np.float64).var(0), rtol=1e-3)
    x_bf16 = jax.random.normal(KEY, (8, 4), jnp.bfloat16)
    bn = nn.BatchNorm(use_running_average=False)
    y, _ = bn.apply(bn.init(KEY, x_bf16), x_bf16, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16


def test_batch_norm_axis_name_averages_across_devices():
    x = jax.random.normal(KEY, (2, 8, 3)) + jnp.array([[[0.0]], [[4.0]]])  # two "devices", different means
    bn = nn.BatchNorm(axis_name="devices", momentum=0.5)
    variables = bn.init(KEY, x[0], use_running_average=False)
    y, updates = jax.vmap(lambda xi: bn.apply(variables, xi, use_running_average=False, mutable=["batch_stats"]),
                          axis_name="devices")(x)
    xn = np.asarray(x, np.float64).reshape(-1, 3)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], np.stack([0.5 * xn.mean(0)] * 2), rtol=1e-5)


def test_normalization_errors():
    with pytest.raises(TypeError, match="LayerNorm: x must be floating point, got dtype int32"):
        nn.LayerNorm().init(KEY, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(TypeError, match="RMSNorm: x must be floating point, got dtype int32"):
        nn.RMSNorm().init(KEY, jnp.ones((2, 4), jnp.int32))
    variables = nn.LayerNorm().init(KEY, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"LayerNorm: x must have 4 features \(last axis\), got shape \(2, 5\)"):
        nn.LayerNorm().apply(variables, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"BatchNorm: x must have rank >= 2, got shape \(4,\)"):
        nn.BatchNorm(use_running_average=False).init(KEY, jnp.ones(4))
    with pytest.raises(ValueError, match=r"BatchNorm: momentum must be in \[0, 1\], got 1.5"):
        nn.BatchNorm(momentum=1.5, use_running_average=False).init(KEY, jnp.ones((2, 4)))
