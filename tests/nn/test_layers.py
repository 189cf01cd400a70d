"""Dense, MLP, Conv, pooling, Embed and Dropout against numpy references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lepton_jax import nn

KEY = jax.random.PRNGKey(0)


def _init_apply(module, *args, **kwargs):
    variables = module.init(KEY, *args, **kwargs)
    return variables, jax.jit(lambda v, *a: module.apply(v, *a, **kwargs))(variables, *args)


def test_dense_and_mlp_match_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    variables, y = _init_apply(nn.Dense(5), x)
    p = variables["params"]
    np.testing.assert_allclose(y, x @ np.asarray(p["kernel"]) + np.asarray(p["bias"]), rtol=1e-5, atol=1e-6)

    mlp = nn.MLP((6, 3), activation=jnp.tanh)
    variables, y = _init_apply(mlp, x)
    p = variables["params"]
    h = np.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    np.testing.assert_allclose(y, h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], rtol=1e-5, atol=1e-5)
    check_grads(lambda v, x: mlp.apply(v, x), (variables, jnp.asarray(x)), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)


def _np_conv(x, w, stride, pads, dilation):
    """Direct loops: x [B, *S, C], w [*K, C, F], pads [(lo, hi)] per axis."""
    n = x.ndim - 2
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    K = w.shape[:n]
    eff = [(k - 1) * d + 1 for k, d in zip(K, dilation)]
    out_sizes = [(x.shape[1 + i] - eff[i]) // stride[i] + 1 for i in range(n)]
    out = np.zeros((x.shape[0], *out_sizes, w.shape[-1]))
    for pos in itertools.product(*(range(s) for s in out_sizes)):
        for offs in itertools.product(*(range(k) for k in K)):
            idx = tuple(p * s + o * d for p, s, o, d in zip(pos, stride, offs, dilation))
            out[(slice(None), *pos)] += x[(slice(None), *idx)] @ w[offs]
    return out


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3,), (1,), "SAME", (1,)),
    ((3,), (2,), "VALID", (2,)),
    ((3, 3), (1, 1), "SAME", (1, 1)),
    ((3, 2), (2, 1), [(1, 0), (0, 2)], (1, 2)),
    ((2, 2), (1, 1), 1, (1, 1)),
])
def test_conv_matches_direct_loops(kernel, stride, padding, dilation):
    n = len(kernel)
    x = np.random.default_rng(1).normal(size=(2, *([7] * n), 3)).astype(np.float32)
    conv = nn.Conv(4, kernel_size=kernel, strides=stride, padding=padding, dilation=dilation)
    variables, y = _init_apply(conv, x)
    w, b = np.asarray(variables["params"]["kernel"]), np.asarray(variables["params"]["bias"])
    if padding == "VALID":
        pads = [(0, 0)] * n
    elif padding == "SAME":
        pads = []
        for k, d, s in zip(kernel, dilation, stride):
            total = max((-(-7 // s) - 1) * s + (k - 1) * d + 1 - 7, 0)
            pads.append((total // 2, total - total // 2))
    elif isinstance(padding, int):
        pads = [(padding, padding)] * n
    else:
        pads = padding
    np.testing.assert_allclose(y, _np_conv(x, w, stride, pads, dilation) + b, rtol=1e-4, atol=1e-4)


def test_conv_gradients():
    conv = nn.Conv(2, kernel_size=(2, 2))
    x = jax.random.normal(KEY, (1, 4, 4, 2))
    variables = conv.init(KEY, x)
    check_grads(lambda v, x: conv.apply(v, x), (variables, x), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_pooling_matches_numpy():
    x = np.random.default_rng(2).normal(size=(2, 6, 5, 3)).astype(np.float32)
    y = nn.max_pool(x, (2, 2))
    expected = x[:, :6, :4].reshape(2, 3, 2, 2, 2, 3).max(axis=(2, 4))
    np.testing.assert_allclose(y, expected)
    np.testing.assert_allclose(nn.avg_pool(x, (2, 2)), x[:, :6, :4].reshape(2, 3, 2, 2, 2, 3).mean(axis=(2, 4)),
                               rtol=1e-6)
    # SAME average pooling averages only real elements at the border.
    y = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    assert y.shape == (2, 3, 3, 3)
    np.testing.assert_allclose(y[:, :, 2], x[:, :, 4].reshape(2, 3, 2, 3).mean(axis=2), rtol=1e-6)
    # 1D, module form.
    x1 = x[:, :, 0]
    np.testing.assert_allclose(nn.MaxPool(3, strides=1).apply({}, x1),
                               np.stack([x1[:, i:i + 3].max(1) for i in range(4)], 1))
    check_grads(lambda x: nn.avg_pool(x, (2, 2)), (jnp.asarray(x),), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_embed_lookup_and_attend():
    embed = nn.Embed(10, 4)
    ids = jnp.array([[1, 2], [9, 0]])
    variables, y = _init_apply(embed, ids)
    table = np.asarray(variables["params"]["embedding"])
    np.testing.assert_array_equal(y, table[np.asarray(ids)])
    x = jnp.ones((3, 4))
    np.testing.assert_allclose(embed.apply(variables, x, method=nn.Embed.attend), x @ table.T, rtol=1e-5)
    with pytest.raises(TypeError, match="ids must be an integer array, got dtype float32"):
        embed.apply(variables, jnp.ones((2,)))
    with pytest.raises(ValueError, match=r"attend: x must end with 4 features, got shape \(3, 5\)"):
        embed.apply(variables, jnp.ones((3, 5)), method=nn.Embed.attend)


def test_dropout_rate_scaling_and_determinism():
    drop = nn.Dropout(0.3)
    x = jnp.ones((200, 100))
    y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.7, rtol=1e-6)
    again = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
    np.testing.assert_array_equal(y, again)
    np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
    with pytest.raises(ValueError, match=r"Dropout: rate must be in \[0, 1\), got 1.0"):
        nn.Dropout(1.0).apply({}, x, deterministic=False, rngs={"dropout": KEY})


def test_bad_inputs_raise_naming_shape_and_dtype():
    with pytest.raises(TypeError, match="Dense: x must be floating point, got dtype int32"):
        nn.Dense(3).init(KEY, jnp.ones((2, 4), jnp.int32))
    variables = nn.Dense(3).init(KEY, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"Dense: x must have 4 input features \(last axis\), got shape \(2, 5\)"):
        nn.Dense(3).apply(variables, jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"Conv: x must have rank 4 \[batch, height, width, channels\], got shape \(8, 8, 1\)"):
        nn.Conv(3, kernel_size=(3, 3)).init(KEY, jnp.ones((8, 8, 1)))
    variables = nn.Conv(3, kernel_size=3).init(KEY, jnp.ones((1, 8, 2)))
    with pytest.raises(ValueError, match=r"Conv: x must have 2 channels \(last axis\), got shape \(1, 8, 5\)"):
        nn.Conv(3, kernel_size=3).apply(variables, jnp.ones((1, 8, 5)))
    with pytest.raises(ValueError, match=r"max_pool: x must have rank 4 .* got shape \(2, 8\)"):
        nn.max_pool(jnp.ones((2, 8)), (2, 2))
    with pytest.raises(ValueError, match=r"Conv: padding must be 'SAME', 'VALID'"):
        nn.Conv(3, kernel_size=3, padding="FULL").init(KEY, jnp.ones((1, 8, 2)))
