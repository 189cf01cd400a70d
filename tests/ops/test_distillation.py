"""The distillation loss against a numpy reference, its T**2 scaling, its
gradients (student only), and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lepton_jax import ops


def _reference(student, teacher, temperature):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_p = log_softmax(teacher / temperature)
    log_q = log_softmax(student / temperature)
    return (np.exp(log_p) * (log_p - log_q)).sum(-1) * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.5])
def test_matches_numpy(temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 7, 10)), 3 * rng.normal(size=(2, 7, 10))
    got = ops.distillation_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                                temperature=temperature, reduction="none")
    np.testing.assert_allclose(got, _reference(student, teacher, temperature), rtol=1e-5, atol=1e-6)
    mean = ops.distillation_loss(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32),
                                 temperature=temperature)
    np.testing.assert_allclose(mean, _reference(student, teacher, temperature).mean(), rtol=1e-5)


def test_gradients_reach_the_student_only():
    rng = np.random.default_rng(1)
    student = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    # (The loss works in fp32 internally, so finite differences are too coarse here; the closed form below
    # is the reference VJP.)
    teacher_grad = jax.grad(lambda t: ops.distillation_loss(student, t))(teacher)
    np.testing.assert_array_equal(teacher_grad, 0.0)
    # Closed form of the gradient: T * (softmax(s / T) - softmax(t / T)) / batch for the mean.
    grad = jax.grad(lambda s: ops.distillation_loss(s, teacher, temperature=3.0))(student)
    want = 3.0 * (jax.nn.softmax(student / 3.0) - jax.nn.softmax(teacher / 3.0)) / 4
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_zero_when_equal_and_errors():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 5)), jnp.float32)
    np.testing.assert_allclose(ops.distillation_loss(logits, logits), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ops.distillation_loss(logits, logits, temperature=0.0)
    with pytest.raises(ValueError, match=r"student_logits.*teacher_logits|teacher_logits.*student_logits"):
        ops.distillation_loss(logits, logits[:, :4])
    with pytest.raises((TypeError, ValueError), match="teacher_logits"):
        ops.distillation_loss(logits, jnp.zeros((3, 5), jnp.int32))
