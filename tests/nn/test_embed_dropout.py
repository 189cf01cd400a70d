"""Embed (lookup, tied attend) and Dropout (keep rate, scaling, determinism)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lepton_jax import nn

KEY = jax.random.key(0)


def test_embed_lookup_attend_and_gradients():
    embed = nn.Embed(10, 4)
    ids = jnp.array([[1, 2, 2], [9, 0, 5]])
    variables = embed.init(KEY, ids)
    table = np.asarray(variables["params"]["embedding"])
    assert table.shape == (10, 4)
    y = embed.apply(variables, ids)
    assert y.shape == (2, 3, 4)
    np.testing.assert_array_equal(y, table[np.asarray(ids)])
    np.testing.assert_array_equal(embed.apply(variables, jnp.int32(7)), table[7])  # scalar id
    x = jax.random.normal(KEY, (2, 3, 4))
    np.testing.assert_allclose(embed.apply(variables, x, method=nn.Embed.attend), np.asarray(x) @ table.T,
                               rtol=1e-5, atol=1e-6)
    # Gradient of a lookup scatters into the looked-up rows only (row 2 twice).
    grad = jax.grad(lambda v: embed.apply(v, ids).sum())(variables)["params"]["embedding"]
    np.testing.assert_array_equal(np.asarray(grad)[:, 0], [1, 1, 2, 0, 0, 1, 0, 0, 0, 1])
    check_grads(jax.jit(lambda v, x: embed.apply(v, x, method=nn.Embed.attend)), (variables, x), order=1,
                modes=("rev",), atol=1e-2, rtol=1e-2)


def test_embed_errors():
    embed = nn.Embed(10, 4)
    variables = embed.init(KEY, jnp.array([1]))
    with pytest.raises(TypeError, match="Embed: ids must be an integer array, got dtype float32"):
        embed.apply(variables, jnp.ones((2,)))
    with pytest.raises(ValueError, match=r"Embed.attend: x must end with 4 features, got shape \(3, 5\)"):
        embed.apply(variables, jnp.ones((3, 5)), method=nn.Embed.attend)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_and_scaling(rate):
    x = jax.random.uniform(KEY, (100, 200), minval=1.0, maxval=2.0)
    y = nn.Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    kept = np.asarray(y) != 0
    # 20000 Bernoulli draws: the std of the kept fraction is <= 0.0036.
    assert abs(kept.mean() - (1 - rate)) < 0.015
    np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / (1 - rate), rtol=1e-6)
    assert abs(float(y.mean()) - float(x.mean())) < 0.05 * float(x.mean()) / (1 - rate) ** 0.5


def test_dropout_determinism_and_modes():
    x = jnp.ones((50, 40))
    drop = nn.Dropout(0.3)
    y1 = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    y2 = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    y3 = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(y1, y3)
    np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(nn.Dropout(0.3, deterministic=True).apply({}, x), x)
    np.testing.assert_array_equal(nn.Dropout(0.0).apply({}, x, deterministic=False), x)  # no RNG needed
    # Gradient flows through the kept elements only, with the same scaling.
    grad = jax.grad(lambda x: drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}).sum())(x)
    np.testing.assert_allclose(grad, np.where(np.asarray(y1) != 0, 1 / 0.7, 0.0), rtol=1e-6)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_dropout_rate_out_of_range(rate):
    with pytest.raises(ValueError, match=rf"Dropout: rate must be in \[0, 1\), got {rate}"):
        nn.Dropout(rate).apply({}, jnp.ones(3), deterministic=False, rngs={"dropout": KEY})
