"""The layers are flax.linen's, with checks added: same parameters, same
outputs as the linen layer of the same settings, linen's fields usable."""

from __future__ import annotations

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import nn, parallel

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (2, 5, 5, 4))


@pytest.mark.parametrize("ours, theirs, x", [
    (nn.Dense(3), linen.Dense(3), X),
    (nn.Dense(3, use_bias=False, precision="highest"), linen.Dense(3, use_bias=False, precision="highest"), X),
    (nn.Conv(6, kernel_size=(3, 3), strides=2, padding="VALID"),
     linen.Conv(6, kernel_size=(3, 3), strides=2, padding="VALID"), X),
    # linen's own fields: grouped convolutions, circular padding.
    (nn.Conv(6, kernel_size=(2, 2), feature_group_count=2, kernel_dilation=2, padding="CIRCULAR"),
     linen.Conv(6, kernel_size=(2, 2), feature_group_count=2, kernel_dilation=2, padding="CIRCULAR"), X),
    (nn.BatchNorm(use_running_average=False, momentum=0.9),
     linen.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False), X + 3.0),
])
def test_layers_equal_linen(ours, theirs, x):
    assert isinstance(ours, type(theirs))
    variables = ours.init(KEY, x)
    reference = theirs.init(KEY, x)
    jax.tree.map(np.testing.assert_array_equal, variables, reference)
    mutable = ["batch_stats"] if "batch_stats" in variables else False
    y, y_ref = ours.apply(variables, x, mutable=mutable), theirs.apply(reference, x, mutable=mutable)
    jax.tree.map(np.testing.assert_array_equal, y, y_ref)


def test_dense_kernel_axes_and_dot_general():
    mlp = nn.MLP((8,), kernel_axes=[("embed", "mlp")])
    axes = parallel.param_logical_axes(mlp, jnp.ones((2, 4)))
    assert jax.tree.map(tuple, axes) == {"Dense_0": {"kernel": ("embed", "mlp"), "bias": ("mlp",)}}
    boxed = nn.Dense(8, kernel_axes=("embed", "mlp")).init(KEY, jnp.ones((2, 4)))["params"]
    calls = []

    def counting_dot_general(*args, **kwargs):
        calls.append(args[0].shape)
        return jax.lax.dot_general(*args, **kwargs)

    variables = linen.meta.unbox({"params": boxed})
    y = nn.Dense(8, dot_general=counting_dot_general).apply(variables, jnp.ones((2, 4)))
    assert calls == [(2, 4)] and y.shape == (2, 8)


def test_logical_param_checks_the_axes_against_the_shape():
    class Model(linen.Module):
        @linen.compact
        def __call__(self, x):
            w = nn.logical_param(self, "w", linen.initializers.ones_init(), (x.shape[-1], 3), ("embed",))
            return x @ w

    with pytest.raises(ValueError, match=r"Model: the logical axes of 'w' must name its 2 dimensions \(4, 3\), "
                                         r"got \('embed',\)"):
        Model().init(KEY, jnp.ones((1, 4)))


def test_batch_norm_keeps_the_input_dtype_where_linen_promotes():
    x = X.astype(jnp.bfloat16)
    variables = nn.BatchNorm(use_running_average=True).init(KEY, x)
    assert nn.BatchNorm(use_running_average=True).apply(variables, x).dtype == jnp.bfloat16
    assert linen.BatchNorm(use_running_average=True).apply(variables, x).dtype == jnp.float32
