"""CheckpointManager: exact round trips, retention, extras, errors, plain-Orbax readability."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lepton_jax import checkpoint, models, train


def _state(seed: int = 0) -> train.TrainState:
    model = models.MLPClassifier(num_classes=3, hidden=(8,))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    return train.create_train_state(model, tx, jnp.zeros((1, 4, 4, 1)), seed=seed)


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_restores_train_state_exactly(tmp_path):
    state = _state()
    state = state.replace(step=jnp.asarray(7, jnp.int32),
                          params=jax.tree.map(lambda p: p + 0.5, state.params))
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.save(7, state, extra={"data": {"epoch": 2, "position": 3}})
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 7
        restored = manager.restore(target=_state(seed=1))
        assert manager.extra() == {"data": {"epoch": 2, "position": 3}}
    assert isinstance(restored, train.TrainState)
    _assert_equal(restored, state)


def test_keeps_the_last_n_and_honours_the_interval(tmp_path):
    state = _state()
    with checkpoint.CheckpointManager(tmp_path, max_to_keep=2, save_interval_steps=2, async_save=False) as m:
        saved = [m.save(step, state) for step in range(1, 7)]
        assert saved == [False, True, False, True, False, True]
        assert m.save(7, state, force=True)
        assert m.all_steps() == [6, 7]
        assert not m.save(7, state, force=True)  # already there: nothing overwritten


def test_restore_without_target_and_with_plain_orbax(tmp_path):
    state = _state()
    with checkpoint.CheckpointManager(tmp_path) as m:
        m.save(3, state)
        tree = m.restore()
    assert isinstance(tree, dict) and set(tree) == {"step", "params", "opt_state", "model_state", "rng"}
    _assert_equal(tree["params"], jax.tree.map(np.asarray, dict(state.params)))
    # A user with only Orbax reads the same arrays.
    plain = ocp.StandardCheckpointer().restore(os.path.join(tmp_path, "3", "state"))
    for x, y in zip(jax.tree.leaves(plain["params"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_errors_name_what_is_wrong(tmp_path):
    with checkpoint.CheckpointManager(tmp_path) as m:
        with pytest.raises(FileNotFoundError, match="no checkpoint in"):
            m.restore()
        m.save(1, {"w": jnp.zeros((3, 4))})
        with pytest.raises(FileNotFoundError, match=r"no step 5 .* steps are \[1\]"):
            m.restore(5)
        with pytest.raises(ValueError, match=r"target leaf 'w' has shape \(4, 4\) but the checkpoint has \(3, 4\)"):
            m.restore(target={"w": jnp.zeros((4, 4))})
        with pytest.raises(ValueError, match="step must be >= 0, got -1"):
            m.save(-1, {"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="max_to_keep must be >= 1, got 0"):
        checkpoint.CheckpointManager(tmp_path / "x", max_to_keep=0)
