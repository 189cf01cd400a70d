"""CheckpointManager: exact round trips, retention, extras, errors, plain-Orbax readability."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

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


def test_restore_without_target_and_with_plain_orbax(tmp_path, subprocess_env):
    state = _state()
    with checkpoint.CheckpointManager(tmp_path) as m:
        m.save(3, state, metrics={"loss": 0.25}, extra={"config": {"lr": 0.1}})
        tree = m.restore()
        assert m.metrics() == {"loss": 0.25}
    assert isinstance(tree, dict) and set(tree) == {"step", "params", "opt_state", "model_state", "rng", "loss_scale"}
    _assert_equal(tree["params"], jax.tree.map(np.asarray, dict(state.params)))
    assert all(leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]) for leaf in jax.tree.leaves(tree))
    # A user with only Orbax reads the same arrays: a subprocess that never imports lepton_jax.
    script = textwrap.dedent(f"""
        import sys, jax, numpy as np, orbax.checkpoint as ocp
        restored = ocp.CheckpointManager({str(tmp_path)!r}).restore(3)
        assert "lepton_jax" not in sys.modules
        leaves = [np.asarray(x) for x in jax.tree.leaves(restored["state"]["params"])]
        np.savez({str(tmp_path / "plain.npz")!r}, *leaves)
        print(restored["extra"]["config"]["lr"], restored["metrics"]["loss"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=subprocess_env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0.1", "0.25"]
    plain = np.load(tmp_path / "plain.npz")
    want = jax.tree.leaves(state.params)
    assert len(plain.files) == len(want)
    for i, leaf in enumerate(want):
        np.testing.assert_array_equal(plain[f"arr_{i}"], leaf)


def test_restores_checkpoints_written_by_plain_orbax(tmp_path):
    tree = {"params": {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4, jnp.bfloat16)}, "step": jnp.asarray(5)}
    plain = ocp.CheckpointManager(tmp_path / "managed", item_names=("state",))
    plain.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(tree)))
    plain.wait_until_finished()
    plain.close()
    _assert_equal(checkpoint.restore(tmp_path / "managed"), tree)
    with ocp.StandardCheckpointer() as single:
        single.save(tmp_path / "single", tree)
    restored = checkpoint.restore(tmp_path / "single", target=jax.tree.map(jnp.zeros_like, tree))
    _assert_equal(restored, tree)


def test_params_only_and_dtype_cast(tmp_path):
    state = _state()
    with checkpoint.CheckpointManager(tmp_path) as m:
        m.save(1, state)
        params = m.restore(params_only=True, dtype=jnp.bfloat16)
        typed = m.restore(target=_state(seed=3), params_only=True)
    assert set(params) == set(state.params)  # only the params subtree comes back
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got, want.astype(jnp.bfloat16))
    _assert_equal(typed, state.params)
    with checkpoint.CheckpointManager(tmp_path / "noparams") as m:
        m.save(1, {"w": jnp.zeros(2)})
        with pytest.raises(ValueError, match="params_only=True but the checkpoint .* has no 'params' subtree"):
            m.restore(params_only=True)


def test_retention_latest_every_n_and_best(tmp_path):
    state = {"w": jnp.zeros(3)}
    with checkpoint.CheckpointManager(tmp_path / "a", max_to_keep=2, keep_every_n_steps=4, async_save=False) as m:
        for step in range(1, 11):
            m.save(step, state)
        assert m.all_steps() == [4, 8, 9, 10]
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.1, 5: 0.7, 6: 0.8}
    with checkpoint.CheckpointManager(tmp_path / "b", max_to_keep=2, best_metric="loss", async_save=False) as m:
        for step, loss in losses.items():
            m.save(step, state, metrics={"loss": loss})
        assert m.all_steps() == [2, 4, 6]  # the two lowest losses and the latest
        assert m.metrics(2) == {"loss": 0.2}
    with checkpoint.CheckpointManager(tmp_path / "c", max_to_keep=1, best_metric="acc", best_mode="max",
                                      async_save=False) as m:
        for step, acc in {1: 0.5, 2: 0.9, 3: 0.7}.items():
            m.save(step, state, metrics={"acc": acc})
        assert m.all_steps() == [2, 3]


def test_save_interval_in_seconds(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(checkpoint.manager.time, "monotonic", lambda: clock[0])
    with checkpoint.CheckpointManager(tmp_path, save_interval_seconds=60, async_save=False) as m:
        assert m.save(1, {"w": jnp.zeros(2)})
        clock[0] += 30
        assert not m.save(2, {"w": jnp.zeros(2)})
        clock[0] += 31
        assert m.save(3, {"w": jnp.zeros(2)})
        assert m.save(4, {"w": jnp.zeros(2)}, force=True)
        assert m.all_steps() == [1, 3, 4]


def test_damaged_latest_step_is_skipped_with_a_warning(tmp_path):
    with checkpoint.CheckpointManager(tmp_path, async_save=False) as m:
        m.save(1, {"w": jnp.full(4, 1.0)})
        m.save(2, {"w": jnp.full(4, 2.0)})
    # Damage step 2: its array data files are truncated.
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for name in files:
            if not name.startswith("_") and "manifest" not in name and not name.endswith(".json"):
                open(os.path.join(root, name), "wb").close()
    shutil.rmtree(tmp_path / "2" / "state" / "d", ignore_errors=True)
    # And leave a half-written save behind, as a killed process would.
    os.makedirs(tmp_path / "3.orbax-checkpoint-tmp-1234")
    with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*3\.orbax-checkpoint-tmp-1234"):
        m = checkpoint.CheckpointManager(tmp_path)
    with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*/2 "):
        restored = m.restore()
    np.testing.assert_array_equal(restored["w"], np.full(4, 1.0))
    with pytest.raises(checkpoint.CorruptCheckpointError, match=r"checkpoint .*/2 is corrupted"):
        m.restore(2)
    m.close()


def test_target_tree_mismatch_names_the_path(tmp_path):
    with checkpoint.CheckpointManager(tmp_path) as m:
        m.save(1, {"params": {"w": jnp.zeros((3, 4))}})
        with pytest.raises(ValueError, match=r"target has 'params/b' \(shape \(4,\)\) but the checkpoint .* does not"):
            m.restore(target={"params": {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}})
        m.save(2, {"params": {"w": jnp.zeros((3, 4)), "z": jnp.zeros(5)}})
        with pytest.raises(ValueError, match=r"the checkpoint .*/2 has 'params/z' \(shape \(5,\)\) but the target"):
            m.restore(target={"params": {"w": jnp.zeros((3, 4))}})


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
