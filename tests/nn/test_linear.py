"""Dense and MLP against numpy matmuls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from lepton_jax import nn

KEY = jax.random.key(0)


@settings(max_examples=8, deadline=None)
@given(batch=st.lists(st.integers(1, 3), min_size=0, max_size=2), in_features=st.integers(1, 6),
       features=st.integers(1, 5), use_bias=st.booleans())
def test_dense_matches_numpy_any_rank(batch, in_features, features, use_bias):
    x = np.random.default_rng(0).normal(size=(*batch, in_features)).astype(np.float32)
    dense = nn.Dense(features, use_bias=use_bias)
    variables = dense.init(KEY, x)
    y = dense.apply(variables, x)
    p = variables["params"]
    expected = x.astype(np.float64) @ np.asarray(p["kernel"], np.float64)
    if use_bias:
        expected = expected + np.asarray(p["bias"])
    else:
        assert "bias" not in p
    assert y.shape == (*batch, features)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_dense_compute_and_param_dtypes():
    x = jnp.ones((2, 4))
    dense = nn.Dense(3, dtype=jnp.bfloat16, bias_init=jax.nn.initializers.ones)
    variables = dense.init(KEY, x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    y = dense.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    expected = np.ones((2, 4)) @ np.asarray(variables["params"]["kernel"]) + 1.0
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2e-2, atol=2e-2)
    # Without dtype, the input's dtype is the compute dtype.
    assert nn.Dense(3).apply(variables, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_mlp_matches_numpy_and_gradients():
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    mlp = nn.MLP((6, 5, 3), activation=jnp.tanh)
    variables = mlp.init(KEY, x)
    y = mlp.apply(variables, x)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = np.tanh(h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
    np.testing.assert_allclose(y, h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"], rtol=1e-5, atol=1e-5)
    check_grads(jax.jit(lambda v, x: mlp.apply(v, x)), (variables, jnp.asarray(x)), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)


def test_mlp_dropout_only_when_training():
    x = jnp.ones((4, 8))
    mlp = nn.MLP((16, 2), dropout_rate=0.5)
    variables = mlp.init(KEY, x)
    plain = nn.MLP((16, 2)).apply(variables, x)
    np.testing.assert_array_equal(mlp.apply(variables, x), plain)  # evaluation by default
    rngs = {"dropout": jax.random.key(3)}
    dropped = mlp.apply(variables, x, train=True, rngs=rngs)
    assert not np.allclose(dropped, plain)
    np.testing.assert_array_equal(dropped, mlp.apply(variables, x, train=True, rngs=rngs))
    # Dropout sits after the hidden activation: each hidden unit is 0 or 2x its value.
    _, state = mlp.apply(variables, x, train=True, rngs=rngs, capture_intermediates=True)
    p = variables["params"]
    hidden = np.asarray(jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]))
    dropped_hidden = np.asarray(state["intermediates"]["Dropout_0"]["__call__"][0])
    assert np.all(np.isclose(dropped_hidden, 0) | np.isclose(dropped_hidden, 2 * hidden, rtol=1e-6))
    assert 0 < np.mean(dropped_hidden[hidden > 0] == 0) < 1
    np.testing.assert_allclose(dropped, dropped_hidden @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"],
                               rtol=1e-5, atol=1e-6)


def test_dense_and_mlp_errors():
    with pytest.raises(TypeError, match="Dense: x must be floating point, got dtype int32"):
        nn.Dense(3).init(KEY, jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match=r"Dense: x must have rank >= 1, got shape \(\)"):
        nn.Dense(3).init(KEY, jnp.float32(1.0))
    variables = nn.Dense(3).init(KEY, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"Dense: x must have 4 input features \(last axis\), got shape \(2, 5\)"):
        nn.Dense(3).apply(variables, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"MLP: features must list at least one layer width, got \(\)"):
        nn.MLP(()).init(KEY, jnp.ones((2, 4)))
