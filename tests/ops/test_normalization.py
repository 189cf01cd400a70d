"""layer_norm / rms_norm against numpy formulas, residual fusion, dtypes, grads, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from lepton_jax import ops


def _np_layer_norm(x, scale, bias, eps):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_rms_norm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


@settings(max_examples=8, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=2), features=st.integers(1, 40),
       seed=st.integers(0, 100))
def test_norms_match_numpy_any_rank(shape, features, seed):
    rng = np.random.default_rng(seed)  # numpy draws: a jax.random draw of a new shape compiles anew
    x = jnp.asarray(rng.standard_normal((*shape, features)) * 3 + 1, jnp.float32)
    scale, bias = (jnp.asarray(rng.standard_normal(features), jnp.float32) for _ in range(2))
    # One jitted program per shape compiles faster than op-by-op dispatch.
    y_ln, y_rms = jax.jit(lambda x, s, b: (ops.layer_norm(x, s, b), ops.rms_norm(x, s)))(x, scale, bias)
    np.testing.assert_allclose(y_ln, _np_layer_norm(x, scale, bias, 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y_rms, _np_rms_norm(x, scale, 1e-6), rtol=1e-4, atol=1e-4)


def test_residual_is_added_once_and_returned():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8))
    r = jax.random.normal(jax.random.PRNGKey(1), (3, 8))
    scale = jnp.full((8,), 2.0)
    y, h = ops.layer_norm(x, scale, None, residual=r)
    np.testing.assert_allclose(h, x + r)
    np.testing.assert_allclose(y, _np_layer_norm(x + r, 2.0, 0.0, 1e-5), rtol=1e-5, atol=1e-5)
    y, h = ops.rms_norm(x, scale, residual=r)
    np.testing.assert_allclose(y, _np_rms_norm(x + r, 2.0, 1e-6), rtol=1e-5, atol=1e-5)


def test_bf16_in_bf16_out_with_fp32_statistics():
    x = (jax.random.normal(jax.random.PRNGKey(0), (4, 256)) * 10 + 300).astype(jnp.bfloat16)
    scale = jnp.ones((256,))
    y = ops.layer_norm(x, scale, jnp.zeros((256,)))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), _np_layer_norm(np.asarray(x, np.float32), 1, 0, 1e-5),
                               atol=5e-2)
    assert ops.rms_norm(x, scale).dtype == jnp.bfloat16


def test_gradients():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6))
    scale, bias = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-1, 1, 6)
    check_grads(jax.jit(lambda x, s, b: ops.layer_norm(x, s, b)), (x, scale, bias), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)
    check_grads(jax.jit(lambda x, s: ops.rms_norm(x, s)), (x, scale), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_errors():
    x = jnp.ones((2, 8))
    with pytest.raises(ValueError, match=r"layer_norm: scale must have shape \(8,\).*got \(4,\)"):
        ops.layer_norm(x, jnp.ones(4), None)
    with pytest.raises(ValueError, match=r"rms_norm: residual must have the shape of x \(2, 8\), got \(8,\)"):
        ops.rms_norm(x, jnp.ones(8), residual=jnp.ones(8))
    with pytest.raises(ValueError, match=r"rms_norm: implementation must be one of \('auto', 'xla'.*\), got 'cuda'"):
        ops.rms_norm(x, jnp.ones(8), implementation="cuda")
    with pytest.raises(TypeError, match="x must be floating point, got dtype int32"):
        ops.layer_norm(jnp.ones((2, 8), jnp.int32), None, None)
