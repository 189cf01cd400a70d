"""Reference classifiers: output shapes, train/eval behaviour, input errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import models


@pytest.mark.parametrize("model", [models.MLPClassifier(), models.CNN(), models.LSTMClassifier()],
                         ids=["mlp", "cnn", "lstm"])
def test_logits_shape_and_determinism(model):
    x = jax.random.uniform(jax.random.PRNGKey(0), (5, 8, 8, 1))
    # Compiled init and apply: op by op, every initializer and layer op compiles on its own.
    variables = jax.jit(lambda keys, x: model.init(keys, x, train=False))(
        {"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}, x)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits = apply(variables, x)
    assert logits.shape == (5, 10) and logits.dtype == jnp.float32
    # Eval mode is deterministic and per-example (a batch of one gives the same row).
    np.testing.assert_allclose(apply(variables, x[:1]), logits[:1], rtol=1e-5, atol=1e-5)


def test_train_mode_uses_dropout_rng():
    model = models.MLPClassifier(dropout_rate=0.5)
    x = jnp.ones((4, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(a, b)


@pytest.mark.parametrize("cls", [models.MLPClassifier, models.CNN, models.LSTMClassifier])
def test_bad_images_raise(cls):
    model = cls()
    with pytest.raises(ValueError, match=r"x must have rank 4 .* got shape \(2, 64\)"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 64)))
    with pytest.raises(TypeError, match="x must be floating point, got dtype int32"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((2, 8, 8, 1), jnp.int32))
