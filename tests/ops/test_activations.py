import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from lepton_jax import ops
from lepton_jax.ops import activations


def test_activations_match_closed_forms():
    x = jnp.linspace(-4, 4, 33)
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(activations.relu(x), np.maximum(xn, 0))
    np.testing.assert_allclose(activations.sigmoid(x), special.expit(xn), rtol=1e-6)
    np.testing.assert_allclose(activations.silu(x), xn * special.expit(xn), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(activations.gelu(x, approximate=False), xn * special.ndtr(xn), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(activations.softplus(x), np.log1p(np.exp(xn)), rtol=1e-5)
    np.testing.assert_allclose(activations.leaky_relu(x, 0.2), np.where(xn > 0, xn, 0.2 * xn), rtol=1e-6)
    np.testing.assert_allclose(activations.softmax(x).sum(), 1.0, rtol=1e-6)


def test_get_activation():
    assert ops.get_activation("relu") is activations.relu
    fn = lambda x: x  # noqa: E731
    assert ops.get_activation(fn) is fn
    with pytest.raises(ValueError, match="unknown activation 'relu7'; known: .*'gelu'"):
        ops.get_activation("relu7")
