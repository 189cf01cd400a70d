"""Losses and penalties against optax and closed forms, with gradients and errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.test_util import check_grads

from lepton_jax import ops


def _logits_labels(seed, shape, classes):
    # numpy draws: a jax.random draw of each new shape would compile anew.
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((*shape, classes)) * 3, jnp.float32),
            jnp.asarray(rng.integers(0, classes, shape), jnp.int32))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 6), classes=st.integers(2, 9),
       smoothing=st.sampled_from([0.0, 0.1, 0.3]))
def test_softmax_cross_entropy_matches_optax(seed, batch, classes, smoothing):
    logits, labels = _logits_labels(seed, (batch, 3), classes)

    @jax.jit  # one program per drawn shape: op by op, each op would compile on its own
    def losses(logits, labels):
        targets = optax.smooth_labels(jax.nn.one_hot(labels, classes), smoothing)
        return (optax.softmax_cross_entropy(logits, targets),
                *(ops.softmax_cross_entropy(logits, labels, label_smoothing=smoothing, reduction=reduction)
                  for reduction in ("none", "mean", "sum")))

    expected, got, got_mean, got_sum = losses(logits, labels)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_mean, expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(got_sum, expected.sum(), rtol=1e-5)


def test_softmax_cross_entropy_integer_labels_and_bf16():
    logits, labels = _logits_labels(0, (16,), 5)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(ops.softmax_cross_entropy(logits, labels), expected, rtol=1e-6)
    got16 = ops.softmax_cross_entropy(logits.astype(jnp.bfloat16), labels)
    assert got16.dtype == jnp.float32  # statistics in fp32
    np.testing.assert_allclose(got16, expected, rtol=2e-2)


def test_ignored_positions_contribute_nothing():
    logits, labels = _logits_labels(1, (8,), 4)
    labels = labels.at[jnp.array([1, 5])].set(-100)
    keep = labels != -100
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[keep], labels[keep]).mean()
    np.testing.assert_allclose(ops.softmax_cross_entropy(logits, labels), expected, rtol=1e-6)

    grad = jax.grad(lambda z: ops.softmax_cross_entropy(z, labels))(logits)
    np.testing.assert_array_equal(grad[~keep], 0.0)
    # Changing an ignored row's logits (even to inf) changes neither loss nor grads.
    poisoned = logits.at[1].set(jnp.inf)
    np.testing.assert_allclose(ops.softmax_cross_entropy(poisoned, labels), expected, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda z: ops.softmax_cross_entropy(z, labels))(poisoned)[keep],
                               grad[keep], rtol=1e-6)
    # `where` masks the same way.
    np.testing.assert_allclose(ops.softmax_cross_entropy(logits, jnp.where(keep, labels, 0), mask=keep),
                               expected, rtol=1e-6)


def test_all_ignored_batch_gives_zero_loss_and_zero_grads():
    logits = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    labels = jnp.full((4,), -100)
    loss, grad = jax.value_and_grad(lambda z: ops.softmax_cross_entropy(z, labels))(logits)
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_cross_entropy_gradients():
    logits, labels = _logits_labels(2, (5,), 4)
    check_grads(jax.jit(lambda z: ops.softmax_cross_entropy(z, labels, label_smoothing=0.1)), (logits,),
                order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
    # Reference VJP: softmax - smoothed one-hot, over the batch.
    grad = jax.grad(lambda z: ops.softmax_cross_entropy(z, labels, label_smoothing=0.1))(logits)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, 4), 0.1)
    np.testing.assert_allclose(grad, (jax.nn.softmax(logits) - targets) / 5, rtol=1e-5, atol=1e-7)


def test_soft_target_cross_entropy_and_regression_losses():
    logits = jax.random.normal(jax.random.PRNGKey(3), (6, 4))
    probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(4), (6, 4)))
    np.testing.assert_allclose(ops.softmax_cross_entropy_with_probs(logits, probs),
                               optax.softmax_cross_entropy(logits, probs).mean(), rtol=1e-6)
    a, b = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3))
    np.testing.assert_allclose(ops.mse(a, b), np.mean((np.arange(6.0) - 1) ** 2))
    np.testing.assert_allclose(ops.mse(a, b), 2 * optax.l2_loss(a, b).mean())
    np.testing.assert_allclose(ops.mae(a, b, reduction="sum"), np.abs(np.arange(6.0) - 1).sum())
    check_grads(jax.jit(lambda p: ops.mse(p, b)), (a,), order=2, modes=("rev",), atol=1e-2, rtol=1e-2)


def test_binary_cross_entropy_matches_optax_and_is_stable():
    logits = jnp.array([-100.0, -3.0, 0.0, 2.0, 100.0])
    targets = jnp.array([0.0, 1.0, 0.5, 1.0, 1.0])
    expected = optax.sigmoid_binary_cross_entropy(logits, targets)
    np.testing.assert_allclose(ops.binary_cross_entropy(logits, targets, reduction="none"), expected, rtol=1e-6)
    assert np.isfinite(ops.binary_cross_entropy(logits, targets))
    probs = jax.nn.sigmoid(logits[1:4])
    np.testing.assert_allclose(ops.binary_cross_entropy(probs, targets[1:4], from_logits=False),
                               expected[1:4].mean(), rtol=1e-5)
    check_grads(jax.jit(lambda z: ops.binary_cross_entropy(z, targets[1:4])), (logits[1:4] * 1.0,), order=1,
                modes=("rev",), atol=1e-2, rtol=1e-2)


def test_penalties_closed_form_and_masks():
    params = {"dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.0]]), "bias": jnp.array([5.0, 5.0])}}
    assert float(ops.l2_penalty(params)) == 0.5 * (1 + 4 + 9 + 50)
    assert float(ops.l1_penalty(params)) == 1 + 2 + 3 + 10
    assert float(ops.l2_penalty(params, mask=ops.weight_mask)) == 0.5 * 14
    assert float(ops.l1_penalty(params, mask={"dense": {"kernel": False, "bias": True}})) == 10
    grad = jax.grad(lambda p: ops.l2_penalty(p, mask=ops.weight_mask))(params)
    np.testing.assert_array_equal(grad["dense"]["kernel"], params["dense"]["kernel"])
    np.testing.assert_array_equal(grad["dense"]["bias"], 0.0)
    with pytest.raises(ValueError, match="mask must have the structure of params"):
        ops.l2_penalty(params, mask={"dense": True})


def test_bad_inputs_name_the_argument():
    logits, labels = _logits_labels(0, (4,), 3)
    with pytest.raises(TypeError, match="labels must be an integer array, got dtype float32"):
        ops.softmax_cross_entropy(logits, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\).*got \(4, 1\)"):
        ops.softmax_cross_entropy(logits, labels[:, None])
    with pytest.raises(TypeError, match="logits must be floating point, got dtype int32"):
        ops.softmax_cross_entropy(labels[:, None], labels)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"):
        ops.mse(logits, logits, reduction="avg")
    with pytest.raises(ValueError, match=r"targets must have the shape of predictions \(4, 3\), got \(4,\)"):
        ops.mse(logits, logits[:, 0])
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.5"):
        ops.softmax_cross_entropy(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"mask must have shape \(4,\), got \(3,\)"):
        ops.softmax_cross_entropy(logits, labels, mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="targets must have the shape of inputs"):
        ops.binary_cross_entropy(logits, logits[0])
