"""Conv and pooling against direct numpy loops (padding, strides, dilation)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lepton_jax import nn

KEY = jax.random.key(0)


def _same_pads(sizes, window, strides, dilation):
    """TF/XLA "SAME": output ceil(size / stride), extra padding on the high side."""
    pads = []
    for size, k, s, d in zip(sizes, window, strides, dilation):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _explicit_pads(padding, sizes, window, strides, dilation):
    n = len(window)
    if padding == "VALID":
        return [(0, 0)] * n
    if padding == "SAME":
        return _same_pads(sizes, window, strides, dilation)
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return list(padding)


def _np_conv(x, w, strides, pads, dilation):
    """x [B, *S, C], w [*K, C, F]."""
    n = x.ndim - 2
    x = np.pad(x.astype(np.float64), [(0, 0), *pads, (0, 0)])
    K = w.shape[:n]
    span = [(k - 1) * d + 1 for k, d in zip(K, dilation)]
    out_sizes = [(x.shape[1 + i] - span[i]) // strides[i] + 1 for i in range(n)]
    out = np.zeros((x.shape[0], *out_sizes, w.shape[-1]))
    for pos in itertools.product(*(range(s) for s in out_sizes)):
        for offs in itertools.product(*(range(k) for k in K)):
            idx = tuple(p * s + o * d for p, s, o, d in zip(pos, strides, offs, dilation))
            out[(slice(None), *pos)] += x[(slice(None), *idx)] @ w[offs]
    return out


def _np_pool(x, window, strides, pads, reduce):
    """Pads with NaN so that ``np.nanmax``/``np.nanmean`` see only real elements."""
    n = x.ndim - 2
    x = np.pad(x.astype(np.float64), [(0, 0), *pads, (0, 0)], constant_values=np.nan)
    out_sizes = [(x.shape[1 + i] - window[i]) // strides[i] + 1 for i in range(n)]
    out = np.zeros((x.shape[0], *out_sizes, x.shape[-1]))
    for pos in itertools.product(*(range(s) for s in out_sizes)):
        block = x[(slice(None), *(slice(p * s, p * s + k) for p, s, k in zip(pos, strides, window)))]
        out[(slice(None), *pos)] = reduce(block, axis=tuple(range(1, n + 1)))
    return out


@pytest.mark.parametrize("kernel, strides, padding, dilation", [
    ((3,), (1,), "SAME", (1,)),
    ((3,), (2,), "VALID", (2,)),
    ((4,), (3,), "SAME", (1,)),
    ((3, 3), (1, 1), "SAME", (1, 1)),
    ((3, 2), (2, 1), [(1, 0), (0, 2)], (1, 2)),
    ((2, 2), (2, 2), 1, (1, 1)),
])
def test_conv_matches_direct_loops(kernel, strides, padding, dilation):
    n = len(kernel)
    sizes = (7, 6)[:n]
    x = np.random.default_rng(1).normal(size=(2, *sizes, 3)).astype(np.float32)
    conv = nn.Conv(4, kernel_size=kernel, strides=strides, padding=padding, kernel_dilation=dilation)
    variables = conv.init(KEY, x)
    y = conv.apply(variables, x)
    w, b = np.asarray(variables["params"]["kernel"]), np.asarray(variables["params"]["bias"])
    assert w.shape == (*kernel, 3, 4)
    pads = _explicit_pads(padding, sizes, kernel, strides, dilation)
    np.testing.assert_allclose(y, _np_conv(x, w, strides, pads, dilation) + b, rtol=1e-4, atol=1e-4)


def test_conv_int_kernel_size_covers_every_spatial_axis_and_dtype():
    x = jnp.ones((1, 5, 5, 2), jnp.bfloat16)
    conv = nn.Conv(3, kernel_size=3, use_bias=False)
    variables = conv.init(KEY, x)
    assert variables["params"]["kernel"].shape == (3, 3, 2, 3)
    assert variables["params"]["kernel"].dtype == jnp.float32
    y = conv.apply(variables, x)
    assert y.shape == (1, 5, 5, 3) and y.dtype == jnp.bfloat16
    assert conv.apply(variables, x.astype(jnp.float32)).dtype == jnp.float32


def test_conv_gradients():
    conv = nn.Conv(2, kernel_size=(2, 2), strides=(2, 1), kernel_dilation=(1, 2))
    x = jax.random.normal(KEY, (1, 5, 5, 2))
    variables = conv.init(KEY, x)
    check_grads(jax.jit(lambda v, x: conv.apply(v, x)), (variables, x), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("window, strides, padding", [
    ((2,), None, "VALID"),
    ((3,), (2,), "SAME"),
    ((2, 2), None, "VALID"),
    ((3, 2), (2, 1), "SAME"),
    ((2, 2), (1, 2), [(1, 0), (0, 1)]),
    ((3, 3), 1, 1),
])
def test_pooling_matches_numpy_loops(window, strides, padding):
    n = len(window)
    sizes = (7, 6)[:n]
    x = np.random.default_rng(2).normal(size=(2, *sizes, 3)).astype(np.float32)
    stride_tuple = window if strides is None else (strides,) * n if isinstance(strides, int) else strides
    pads = _explicit_pads(padding, sizes, window, stride_tuple, (1,) * n)
    np.testing.assert_allclose(nn.max_pool(x, window, strides, padding),
                               _np_pool(x, window, stride_tuple, pads, np.nanmax), rtol=1e-6)
    np.testing.assert_allclose(nn.avg_pool(x, window, strides, padding),
                               _np_pool(x, window, stride_tuple, pads, np.nanmean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(nn.MaxPool(window, strides, padding).apply({}, x), nn.max_pool(x, window, strides, padding))
    np.testing.assert_allclose(nn.AvgPool(window, strides, padding).apply({}, x), nn.avg_pool(x, window, strides, padding))


def test_pooling_int_window_bf16_and_gradients():
    x = jax.random.normal(KEY, (2, 4, 6, 3))
    np.testing.assert_allclose(nn.max_pool(x, 2), nn.max_pool(x, (2, 2)))
    assert nn.avg_pool(x.astype(jnp.bfloat16), 2, padding="SAME").dtype == jnp.bfloat16
    check_grads(jax.jit(lambda x: nn.avg_pool(x, (3, 2), 1, "SAME")), (x,), order=1, modes=("rev",),
                atol=1e-2, rtol=1e-2)
    check_grads(jax.jit(lambda x: nn.max_pool(x, (2, 2))), (x,), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_conv_and_pooling_errors():
    with pytest.raises(ValueError, match=r"Conv: x must have rank 4 \[batch, height, width, channels\] "
                                         r"for a 2D kernel_size, got shape \(8, 8, 1\)"):
        nn.Conv(3, kernel_size=(3, 3)).init(KEY, jnp.ones((8, 8, 1)))
    with pytest.raises(ValueError, match=r"Conv: x must have rank 3 .* or 4 .*, got shape \(8, 1\)"):
        nn.Conv(3, kernel_size=3).init(KEY, jnp.ones((8, 1)))
    with pytest.raises(ValueError, match=r"Conv: kernel_size must be an int or have 1 or 2 entries, got \(1, 2, 3\)"):
        nn.Conv(3, kernel_size=(1, 2, 3)).init(KEY, jnp.ones((1, 8, 8, 8, 1)))
    with pytest.raises(TypeError, match="Conv: x must be floating point, got dtype int32"):
        nn.Conv(3, kernel_size=3).init(KEY, jnp.ones((1, 8, 2), jnp.int32))
    variables = nn.Conv(3, kernel_size=3).init(KEY, jnp.ones((1, 8, 2)))
    with pytest.raises(ValueError, match=r"Conv: x must have 2 channels \(last axis\), got shape \(1, 8, 5\)"):
        nn.Conv(3, kernel_size=3).apply(variables, jnp.ones((1, 8, 5)))
    with pytest.raises(ValueError, match=r"Conv: padding must be 'SAME', 'VALID'.*got 'FULL'"):
        nn.Conv(3, kernel_size=3, padding="FULL").init(KEY, jnp.ones((1, 8, 2)))
    with pytest.raises(ValueError, match=r"Conv: strides must be an int or have 2 entries, got \(1, 2, 3\)"):
        nn.Conv(3, kernel_size=(3, 3), strides=(1, 2, 3)).init(KEY, jnp.ones((1, 8, 8, 2)))
    with pytest.raises(ValueError, match=r"max_pool: x must have rank 4 .* got shape \(2, 8\)"):
        nn.max_pool(jnp.ones((2, 8)), (2, 2))
    with pytest.raises(TypeError, match="avg_pool: x must be floating point, got dtype int32"):
        nn.avg_pool(jnp.ones((2, 8, 1), jnp.int32), 2)
