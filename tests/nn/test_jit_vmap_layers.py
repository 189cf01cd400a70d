"""Every module under jax.jit (same values as eager) and under jax.vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import nn

KEY = jax.random.key(0)
X_BxTxF = jax.random.normal(KEY, (2, 5, 4))
X_BxHxWxC = jax.random.normal(KEY, (2, 6, 6, 3))

# (module, input, apply kwargs, mutable collections, needs a dropout key)
CASES = {
    "Dense": (nn.Dense(3), X_BxTxF, {}, False, False),
    "MLP": (nn.MLP((8, 3), dropout_rate=0.2), X_BxTxF, {"train": True}, False, True),
    "Conv1D": (nn.Conv(3, kernel_size=(2,), strides=2), X_BxTxF, {}, False, False),
    "Conv2D": (nn.Conv(3, kernel_size=(3, 3), kernel_dilation=2), X_BxHxWxC, {}, False, False),
    "MaxPool": (nn.MaxPool((2, 2), padding="SAME"), X_BxHxWxC, {}, False, False),
    "AvgPool": (nn.AvgPool((3,), strides=1, padding="SAME"), X_BxTxF, {}, False, False),
    "Embed": (nn.Embed(7, 3), jnp.array([[1, 6], [0, 2]]), {}, False, False),
    "LSTM": (nn.LSTM(3), X_BxTxF, {"lengths": jnp.array([5, 2])}, False, False),
    "GRU": (nn.GRU(3, reverse=True), X_BxTxF, {"lengths": jnp.array([3, 5])}, False, False),
    "Bidirectional": (nn.Bidirectional(nn.GRU(2), nn.LSTM(2, reverse=True)), X_BxTxF, {}, False, False),
    "LayerNorm": (nn.LayerNorm(), X_BxTxF, {}, False, False),
    "RMSNorm": (nn.RMSNorm(), X_BxTxF, {}, False, False),
    "BatchNorm": (nn.BatchNorm(use_running_average=False), X_BxTxF, {}, True, False),
    "Dropout": (nn.Dropout(0.5), X_BxTxF, {"deterministic": False}, False, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_module_under_jit_matches_eager(name):
    module, x, kwargs, mutable, needs_rng = CASES[name]
    rngs = {"dropout": jax.random.key(1)} if needs_rng else {}
    variables = module.init({"params": KEY, **rngs}, x, **kwargs)
    extra = {"mutable": ["batch_stats"]} if mutable else {}

    def apply(variables, x):
        return module.apply(variables, x, rngs=rngs, **kwargs, **extra)

    eager, jitted = apply(variables, x), jax.jit(apply)(variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted)


@pytest.mark.parametrize("name", ["Dense", "Conv2D", "LSTM", "LayerNorm", "Embed", "MaxPool"])
def test_module_under_vmap_matches_batched_call(name):
    """vmap over an extra leading axis gives the same as folding it into the batch."""
    module, x, kwargs, _, _ = CASES[name]
    kwargs = {k: v for k, v in kwargs.items() if k != "lengths"}
    variables = module.init(KEY, x, **kwargs)
    x_NxB = jnp.stack([x, x[::-1]])
    vmapped = jax.vmap(lambda xi: module.apply(variables, xi, **kwargs))(x_NxB)
    folded = module.apply(variables, x_NxB.reshape(-1, *x.shape[1:]), **kwargs)
    folded = jax.tree.map(lambda a: a.reshape(2, -1, *a.shape[1:]), folded)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), vmapped, folded)
