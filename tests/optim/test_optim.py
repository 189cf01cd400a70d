"""Optimizer presets against optax chains built by hand; schedules, masks,
accumulation and EMA against closed forms."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax import optim

PARAMS = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4) / 10, "bias": jnp.linspace(-1, 1, 4)},
          "norm": {"scale": jnp.ones(4)}}
MASK = {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False}}


def _grads(step):
    key = jax.random.PRNGKey(step)
    return jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(key, p.size), p.shape), PARAMS)


def _run(tx, steps=5):
    params, state = PARAMS, tx.init(PARAMS)
    for step in range(steps):
        updates, state = tx.update(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


SCHEDULE = optim.ScheduleConfig(name="cosine", peak_lr=0.1, warmup_steps=2, total_steps=10)
SCHED_FN = optax.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10, 0.0)

CASES = {
    "sgd": (optim.OptimizerConfig(name="sgd", learning_rate=0.1, l2=0.01, decay_mask="auto"),
            optax.chain(optax.add_decayed_weights(0.01, MASK), optax.sgd(0.1))),
    "momentum": (optim.OptimizerConfig(name="momentum", learning_rate=0.1, momentum=0.8, l2=0.01),
                 optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.1, momentum=0.8))),
    "nesterov": (optim.OptimizerConfig(name="nesterov", learning_rate=0.1),
                 optax.sgd(0.1, momentum=0.9, nesterov=True)),
    "adam": (optim.OptimizerConfig(name="adam", learning_rate=SCHEDULE, b1=0.8, clip_norm=1.0),
             optax.chain(optax.clip_by_global_norm(1.0), optax.adam(SCHED_FN, b1=0.8))),
    "adamw": (optim.OptimizerConfig(name="adamw", learning_rate=SCHEDULE, weight_decay=0.1, decay_mask="auto",
                                    clip_norm=0.5),
              optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(SCHED_FN, weight_decay=0.1, mask=MASK))),
    "adagrad": (optim.OptimizerConfig(name="adagrad", learning_rate=0.1), optax.adagrad(0.1)),
    "lion": (optim.OptimizerConfig(name="lion", learning_rate=0.01, weight_decay=0.1, decay_mask="auto"),
             optax.lion(0.01, weight_decay=0.1, mask=MASK)),
    "adafactor": (optim.OptimizerConfig(name="adafactor", learning_rate=0.01), optax.adafactor(0.01)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_presets_equal_optax_built_by_hand(name):
    config, reference = CASES[name]
    got, _ = _run(optim.make_optimizer(config))
    expected, _ = _run(reference)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-6)
    # The convenience function builds the same thing.
    options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ("name", "learning_rate")}
    via_function, _ = _run(getattr(optim, name)(config.learning_rate, **options))
    chex.assert_trees_all_close(via_function, expected, rtol=1e-6, atol=1e-6)


# Each preset with only a learning rate is the optax alias of the same name.
ALIASES = {
    "sgd": optax.sgd(0.1), "momentum": optax.sgd(0.1, momentum=0.9), "nesterov": optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": optax.adam(0.1), "adamw": optax.adamw(0.1), "adagrad": optax.adagrad(0.1), "lion": optax.lion(0.1),
    "adafactor": optax.adafactor(0.1),
}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_presets_mean_what_the_optax_alias_means(name):
    got, _ = _run(getattr(optim, name)(0.1))
    expected, _ = _run(ALIASES[name])
    chex.assert_trees_all_equal(got, expected)  # the same transforms in the same order: bitwise
    assert set(optim.OPTIMIZERS) == set(ALIASES)


def test_l2_is_coupled_and_weight_decay_decoupled():
    # L2 goes through Adam's normalisation; adamw's decay does not.
    l2, _ = _run(optim.adam(0.1, l2=0.01))
    expected, _ = _run(optax.chain(optax.add_decayed_weights(0.01), optax.adam(0.1)))
    chex.assert_trees_all_equal(l2, expected)
    decoupled, _ = _run(optim.adamw(0.1, weight_decay=0.01))
    chex.assert_trees_all_equal(decoupled, _run(optax.adamw(0.1, weight_decay=0.01))[0])
    assert not np.allclose(l2["dense"]["kernel"], decoupled["dense"]["kernel"])


def test_schedules_closed_form():
    cosine = optim.warmup_cosine(1.0, 10, 110, end_lr=0.1)
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-5)
    assert float(cosine(110)) == pytest.approx(0.1)
    linear = optim.warmup_linear(2.0, 4, 12)
    assert [float(linear(s)) for s in (0, 2, 4, 8, 12)] == pytest.approx([0.0, 1.0, 2.0, 1.0, 0.0])
    step = optim.step_decay(1.0, (3, 6), factor=0.5)
    assert [float(step(s)) for s in (0, 2, 3, 5, 6, 9)] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    assert float(optim.make_schedule(optim.ScheduleConfig(name="constant", peak_lr=0.3))(99)) == pytest.approx(0.3)


def test_decay_mask_on_flax_style_params():
    params = {"Dense_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
              "LayerNorm_0": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
              "Embed_0": {"embedding": jnp.ones((10, 4))},
              "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2))}}
    assert optim.decay_mask(params) == {
        "Dense_0": {"kernel": True, "bias": False}, "LayerNorm_0": {"scale": False, "bias": False},
        "Embed_0": {"embedding": True}, "Conv_0": {"kernel": True}}


def test_accumulation_equals_one_step_on_the_mean_gradient():
    k = 3
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adam", learning_rate=0.1, accumulate_steps=k))
    state = tx.init(PARAMS)
    params = PARAMS
    for micro in range(k):
        updates, state = tx.update(_grads(micro), state, params)
        params = optax.apply_updates(params, updates)
        if micro < k - 1:
            chex.assert_trees_all_equal(params, PARAMS)  # nothing applied on micro-steps
    mean_grad = jax.tree.map(lambda *g: sum(g) / k, *[_grads(m) for m in range(k)])
    reference = optax.adam(0.1)
    updates, _ = reference.update(mean_grad, reference.init(PARAMS), PARAMS)
    chex.assert_trees_all_close(params, optax.apply_updates(PARAMS, updates), rtol=1e-6, atol=1e-6)


def test_parameter_ema_closed_form_and_under_accumulation():
    decay = 0.5
    tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=0.1, ema_decay=decay))
    params, state = PARAMS, tx.init(PARAMS)
    history = []
    for step in range(4):
        updates, state = tx.update(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    # Debiased EMA: sum_i (1-d) d^(n-1-i) p_i / (1 - d^n).
    n = len(history)
    weights = [(1 - decay) * decay ** (n - 1 - i) for i in range(n)]
    expected = jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps)) / (1 - decay ** n), *history)
    chex.assert_trees_all_close(optim.ema_params(state), expected, rtol=1e-6, atol=1e-6)

    # Inside accumulation the EMA moves only when an update is applied.
    tx = optim.make_optimizer(optim.OptimizerConfig(name="sgd", learning_rate=0.1, ema_decay=decay,
                                                    accumulate_steps=2))
    state = tx.init(PARAMS)
    updates, state = tx.update(_grads(0), state, PARAMS)
    chex.assert_trees_all_equal(optim.ema_params(state), jax.tree.map(jnp.zeros_like, PARAMS))
    updates, state = tx.update(_grads(1), state, PARAMS)
    chex.assert_trees_all_close(optim.ema_params(state), optax.apply_updates(PARAMS, updates), rtol=1e-6)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match=r"unknown name 'rmsprop'; expected one of \('sgd'"):
        optim.make_optimizer(optim.OptimizerConfig(name="rmsprop"))
    with pytest.raises(ValueError, match="learning_rate must be a float >= 0 or a ScheduleConfig, got -1"):
        optim.make_optimizer(optim.OptimizerConfig(learning_rate=-1))
    with pytest.raises(ValueError, match=r"weight_decay is decoupled weight decay, which 'adam' does not take .*l2=0.1"):
        optim.adam(1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="l2 must be >= 0, got -1"):
        optim.sgd(1e-3, l2=-1)
    with pytest.raises(ValueError, match="accumulate_steps must be an int >= 1, got 0"):
        optim.make_optimizer(optim.OptimizerConfig(accumulate_steps=0))
    with pytest.raises(ValueError, match="need 0 <= warmup_steps <= total_steps.*warmup_steps=20, total_steps=10"):
        optim.make_schedule(optim.ScheduleConfig(warmup_steps=20, total_steps=10))
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\), got 1.0"):
        optim.parameter_ema(1.0)
    with pytest.raises(ValueError, match="parameter_ema: update needs params"):
        tx = optim.parameter_ema(0.9)
        tx.update(PARAMS, tx.init(PARAMS))
    with pytest.raises(ValueError, match="exactly one parameter_ema state, found 0"):
        optim.ema_params(optax.adam(0.1).init(PARAMS))
