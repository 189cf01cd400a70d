"""Dynamic loss scaling: the scale schedule in closed form, skipped steps
leave the state untouched, and float16 gradients that underflow without a
scale survive with one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen

from lepton_jax import train


class HalfLinear(linen.Module):
    """fp32 parameters, float16 compute."""

    @linen.compact
    def __call__(self, x, train: bool = False):
        w = self.param("w", linen.initializers.normal(1.0), (x.shape[-1], 3), jnp.float32)
        return (x.astype(jnp.float16) @ w.astype(jnp.float16)).astype(jnp.float32)


def _sum_loss(weight):
    return lambda outputs, batch: weight * jnp.sum(outputs)


def test_schedule_closed_form():
    scale = train.DynamicLossScale.create(8.0, growth_interval=3, min_scale=2.0)
    history = []
    for finite in [True, True, True, True, False, False, False, True]:
        scale = scale.adjust(jnp.asarray(finite))
        history.append((float(scale.scale), int(scale.good_steps)))
    # Three finite steps double it; each non-finite one halves it, never below min_scale.
    assert history == [(8, 1), (8, 2), (16, 0), (16, 1), (8, 0), (4, 0), (2, 0), (2, 1)]
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        train.DynamicLossScale.create(backoff_factor=1.5)
    with pytest.raises(ValueError, match="loss_scale must be None, 'dynamic'"):
        train.create_train_state(HalfLinear(), optax.sgd(0.1), jnp.zeros((1, 4)), loss_scale="static")


def test_overflowing_steps_are_skipped_then_training_resumes():
    model, tx = HalfLinear(), optax.adam(1e-2)
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    # 2**24 times a unit cotangent overflows float16 (max 65504) in the backward pass.
    state = train.create_train_state(model, tx, x, loss_scale=train.DynamicLossScale.create(2.0**24))
    step = train.make_train_step(model, tx, _sum_loss(1.0), input_key="x")
    before = state
    state, metrics = step(state, {"x": x})
    assert float(metrics["skipped_step"]) == 1.0 and float(metrics["loss_scale"]) == 2.0**24
    assert int(state.step) == 1 and float(state.loss_scale.scale) == 2.0**23
    jax.tree.map(np.testing.assert_array_equal, (state.params, state.opt_state), (before.params, before.opt_state))
    skipped = 1
    while True:
        state, metrics = step(state, {"x": x})
        if float(metrics["skipped_step"]) == 0.0:
            break
        skipped += 1
    # Halving from 2**24 until the backward fits float16: a known number of skips.
    assert float(metrics["loss_scale"]) < 65504
    assert not np.array_equal(state.params["w"], before.params["w"])
    assert skipped == 24 - int(np.log2(float(metrics["loss_scale"])))


def test_scaling_rescues_underflowing_float16_gradients():
    model, tx = HalfLinear(), optax.sgd(1.0)
    x = jnp.ones((2, 4))
    loss_fn = _sum_loss(1e-9)  # cotangents of 1e-9 underflow float16 (smallest subnormal 6e-8)
    plain = train.create_train_state(model, tx, x)
    scaled = train.create_train_state(model, tx, x, loss_scale="dynamic")
    _, m_plain = train.make_train_step(model, tx, loss_fn, input_key="x")(plain, {"x": x})
    new, m_scaled = train.make_train_step(model, tx, loss_fn, input_key="x")(scaled, {"x": x})
    assert float(m_plain["grad_norm"]) == 0.0
    # The true gradient of 1e-9 * sum(x @ w) is 1e-9 * sum over the batch of x: 2e-9 per weight.
    np.testing.assert_allclose(m_scaled["grad_norm"], np.sqrt(12) * 2e-9, rtol=1e-3)
    assert float(m_scaled["skipped_step"]) == 0.0


def test_fp32_step_with_scale_matches_unscaled():
    model, tx = HalfLinear(), optax.sgd(0.1)
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 4))
    loss_fn = lambda outputs, batch: jnp.mean(outputs ** 2)  # noqa: E731
    a = train.create_train_state(model, tx, x)
    b = train.create_train_state(model, tx, x, loss_scale=train.DynamicLossScale.create(2.0**8))
    step = train.make_train_step(model, tx, loss_fn, input_key="x")
    for _ in range(3):
        a, ma = step(a, {"x": x})
        b, mb = step(b, {"x": x})
        np.testing.assert_allclose(mb["loss"], ma["loss"], rtol=1e-6)
    np.testing.assert_allclose(b.params["w"], a.params["w"], rtol=1e-6)
