"""Injected hyperparameters: the same updates as the plain optimizer, and a
vmapped population whose members equal the optimizers of their own values."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax import optim

PARAMS = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.linspace(0.1, 0.4, 4)}}


def _config(peak: float, weight_decay: float) -> optim.OptimizerConfig:
    schedule = optim.ScheduleConfig(name="cosine", peak_lr=peak, warmup_steps=2, total_steps=8, end_lr=peak / 10)
    return optim.OptimizerConfig(name="adamw", learning_rate=schedule, weight_decay=weight_decay, decay_mask="auto",
                                 clip_norm=1.0)


def _run(tx: optax.GradientTransformation, opt_state=None, steps: int = 6):
    return _updates(tx, opt_state if opt_state is not None else tx.init(PARAMS), steps)


# The updates compiled as one program: op by op, each op of the optimizer's
# chain would compile on its own, for every optimizer the tests build.
@functools.partial(jax.jit, static_argnums=(0, 2))
def _updates(tx: optax.GradientTransformation, state, steps: int):
    params = PARAMS
    for i in range(steps):
        grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_injected_equals_plain_and_set_hyperparams_equals_a_new_config():
    plain = _run(optim.make_optimizer(_config(1e-2, 1e-3)))
    tx = optim.make_optimizer(_config(1e-2, 1e-3), inject=("learning_rate", "weight_decay"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), _run(tx), plain)
    # Other values set in the state: as if configured with them.
    state = optim.set_hyperparams(tx.init(PARAMS), learning_rate=3e-2, weight_decay=1e-2)
    other = _run(optim.make_optimizer(_config(3e-2, 1e-2)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), _run(tx, state), other)


def test_a_vmapped_population_equals_each_member_alone():
    values = [(1e-2, 1e-3), (3e-2, 0.0), (5e-3, 1e-1)]
    tx = optim.make_optimizer(_config(1e-2, 1e-3), inject=("learning_rate", "weight_decay"))
    states = jax.vmap(lambda _: tx.init(PARAMS))(jnp.arange(len(values)))
    states = optim.set_hyperparams(states, learning_rate=jnp.array([v[0] for v in values]),
                                   weight_decay=jnp.array([v[1] for v in values]))
    population = jax.vmap(lambda s: _run(tx, s))(states)
    for k, (lr, wd) in enumerate(values):
        alone = _run(optim.make_optimizer(_config(lr, wd)))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a[k], b, rtol=1e-5, atol=1e-7), population, alone)


def test_inject_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"make_optimizer: inject takes names from \('learning_rate', 'weight_decay'\), "
                                         r"got 'momentum'"):
        optim.make_optimizer(_config(1e-2, 0.0), inject=("momentum",))
    with pytest.raises(ValueError, match="inject=\\('weight_decay',\\) needs adamw or lion, got 'sgd'"):
        optim.make_optimizer(optim.OptimizerConfig(name="sgd"), inject=("weight_decay",))
    with pytest.raises(ValueError, match=r"set_hyperparams: the optimizer injects \['learning_rate'\], got \['weight_decay'\]"):
        optim.set_hyperparams(optim.make_optimizer(_config(1e-2, 0.0), inject=("learning_rate",)).init(PARAMS),
                              weight_decay=0.1)
    with pytest.raises(ValueError, match="set_hyperparams: opt_state has no injected hyperparameters"):
        optim.set_hyperparams(optim.make_optimizer(_config(1e-2, 0.0)).init(PARAMS), learning_rate=0.1)
