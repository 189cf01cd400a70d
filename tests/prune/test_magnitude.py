"""Magnitude pruning: the schedule against its closed form, exact sparsity
globally and per layer, the 2:4 pattern group by group, pruned weights that
stay zero, and digits classifiers at 90% sparsity within a point of dense."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax import data, prune, train
from recipes import digits


def test_schedule_matches_the_closed_form():
    schedule = prune.polynomial_sparsity(0.8, 10, 110, initial=0.1, power=3)
    for t in [0, 5, 10, 11, 37, 60, 109, 110, 500]:
        progress = min(max((t - 10) / 100, 0.0), 1.0)
        np.testing.assert_allclose(schedule(t), 0.8 + (0.1 - 0.8) * (1 - progress) ** 3, rtol=1e-6)
    with pytest.raises(ValueError, match="need 0 <= initial <= target < 1"):
        prune.polynomial_sparsity(1.0, 0, 10)
    with pytest.raises(ValueError, match="begin_step < end_step"):
        prune.polynomial_sparsity(0.5, 10, 10)


def _params(key=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(key), 3)
    return {"a": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jax.random.normal(k2, (8,))},
            "b": {"kernel": 3.0 * jax.random.normal(k3, (8, 4))}}


@pytest.mark.parametrize("scope", ["global", "per_layer"])
def test_masks_hit_the_requested_sparsity(scope):
    params = _params()
    tx = prune.magnitude_prune(lambda step: jnp.asarray(0.75), scope=scope)
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    pruned = optax.apply_updates(params, updates)
    zeros = {k: int(np.sum(np.asarray(v) == 0)) for k, v in prune.sparsity(pruned).items()}
    fractions = prune.sparsity(pruned)
    assert fractions["a/bias"] == 0.0  # biases are not prunable
    if scope == "per_layer":
        assert fractions["a/kernel"] == 0.75 and fractions["b/kernel"] == 0.75
    else:
        total = 16 * 8 + 8 * 4
        assert round(fractions["a/kernel"] * 128 + fractions["b/kernel"] * 32) == int(0.75 * total)
        # One threshold: every kept weight is at least as large as every pruned one.
        flat = np.concatenate([np.asarray(params["a"]["kernel"]).ravel(), np.asarray(params["b"]["kernel"]).ravel()])
        kept = np.concatenate([np.asarray(pruned["a"]["kernel"]).ravel(), np.asarray(pruned["b"]["kernel"]).ravel()])
        assert np.abs(flat[kept != 0]).min() >= np.abs(flat[kept == 0]).max()
    del zeros


def test_two_four_pattern_group_by_group():
    params = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (16, 6))},
              "conv": {"kernel": jax.random.normal(jax.random.PRNGKey(2), (3, 3, 8, 5))}}
    tx = prune.magnitude_prune(lambda step: jnp.asarray(0.5), structure="2:4")
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    pruned = optax.apply_updates(params, updates)
    for name, axis in (("dense", 0), ("conv", 2)):
        w, original = np.asarray(pruned[name]["kernel"]), np.asarray(params[name]["kernel"])
        groups = np.moveaxis(w, axis, -1).reshape(-1, 4)
        assert np.all((groups != 0).sum(-1) == 2)
        ref = np.moveaxis(np.abs(original), axis, -1).reshape(-1, 4)
        kept_min = np.where(groups != 0, ref, np.inf).min(-1)
        pruned_max = np.where(groups == 0, ref, -np.inf).max(-1)
        assert np.all(kept_min >= pruned_max)
    with pytest.raises(ValueError, match=r"'w' has shape \(6, 3\); its input axis 0 \(6\) must be a multiple of M=4"):
        prune.magnitude_prune(lambda s: jnp.asarray(0.5), structure="2:4").init({"w": jnp.ones((6, 3))})
    with pytest.raises(ValueError, match="structure must be"):
        prune.magnitude_prune(lambda s: 0.5, structure="4:2")


def test_pruned_weights_stay_zero_under_the_optimizer():
    params = _params()
    tx = optax.chain(optax.adam(0.1), prune.magnitude_prune(prune.polynomial_sparsity(0.6, 0, 5, frequency=2)))
    state = tx.init(params)
    grad_fn = jax.jit(jax.grad(lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))))
    history = []
    for step in range(12):
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
        history.append(prune.sparsity(params)["a/kernel"])
        masks = state[1].masks
        for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0)
    assert history[-1] >= 0.5 and history == sorted(history)  # gradual, never revived
    np.testing.assert_array_equal(prune.apply_masks(params, state)["a"]["kernel"], params["a"]["kernel"])


@pytest.mark.compute_bound
@pytest.mark.slow
@pytest.mark.parametrize("name, steps", [("mlp", 600), ("cnn", 400)])
def test_digits_at_90_percent_sparsity_within_a_point(name, steps):
    train_split, _, test_split, _ = digits.load_splits(0)
    accuracies = {}
    for pruned in (False, True):
        model = digits.build_model(name)
        base = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
        tx = optax.chain(base, prune.magnitude_prune(prune.polynomial_sparsity(0.9, steps // 6, steps * 2 // 3,
                                                                               frequency=10))) if pruned else base
        state = train.create_train_state(model, tx, train_split["image"][:1])
        loss = train.classification_loss()
        hooks = train.default_hooks(eval_step=train.make_eval_step(model, loss, num_classes=10, input_key="image"),
                                    eval_data=test_split, eval_every=steps, progress=False)
        result = train.fit(state, train.make_train_step(model, tx, loss, input_key="image"), data.BatchIterator(train_split, 64),
                           num_steps=steps, hooks=hooks)
        accuracies[pruned] = result.eval_metrics["accuracy"]
        if pruned:
            kernels = {k: v for k, v in prune.sparsity(result.state.params).items() if k.endswith("kernel")}
            total = sum(np.size(x) for x in jax.tree.leaves(result.state.params) if np.ndim(x) >= 2)
            zeros = sum(np.sum(np.asarray(x) == 0) for x in jax.tree.leaves(result.state.params) if np.ndim(x) >= 2)
            assert zeros / total >= 0.899, kernels
    print(f"{name}: dense {accuracies[False]:.4f}, 90% sparse {accuracies[True]:.4f}")
    assert accuracies[False] > 0.95
    assert accuracies[True] >= accuracies[False] - 0.01, accuracies
