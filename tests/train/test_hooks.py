"""fit's hooks: a user's own hook, stopping, early stopping, reduce-LR-on-plateau."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.contrib import ReduceLROnPlateauState, reduce_on_plateau

from lepton_jax import checkpoint, data, models, train


def _setup(tx=None, n=64):
    rng = np.random.default_rng(0)
    split = {"image": rng.normal(size=(n, 2, 3, 1)).astype(np.float32), "label": rng.integers(0, 3, n).astype(np.int32)}
    model = models.MLPClassifier(num_classes=3, hidden=(8,), dropout_rate=0.0)
    tx = tx or optax.sgd(0.1)
    state = train.create_train_state(model, tx, split["image"][:1], seed=0)
    step = train.make_train_step(model, tx, train.classification_loss(), input_key="image")
    return state, step, data.BatchIterator(split, 16, seed=1), split, model


class _Scripted(train.Hook):
    """Logs a scripted value as an eval row at every step (the metric a real
    Evaluate would log), so the watchers' decisions can be checked by hand."""

    def __init__(self, values, metric="loss"):
        super().__init__(every=1)
        self.values, self.metric = list(values), metric

    def __call__(self, loop):
        loop.log("eval", {self.metric: self.values[loop.step - 1]})


def test_a_users_hook_runs_every_n_steps_and_can_stop_training():
    state, step, batches, _, _ = _setup()
    seen, calls = [], []

    class StopAtSeven(train.Hook):
        def __call__(self, loop):
            seen.append((loop.step, float(loop.metrics["loss"])))
            if loop.step >= 7:
                loop.request_stop("seven is enough")

    result = train.fit(state, step, batches, num_steps=20,
                       hooks=[StopAtSeven(every=3), train.every(2)(lambda loop: calls.append(loop.step)),
                              train.TrainMetrics(every=4)])
    # Called at 3 and 6, then at 9 it stops; the function hook runs on even
    # steps and, as every hook does, at the step training ends.
    assert [s for s, _ in seen] == [3, 6, 9]
    assert calls == [2, 4, 6, 8, 9]
    assert result.stop_reason == "seven is enough" and int(result.state.step) == 9
    # The train-metric window cut short by the stop is still logged.
    assert [r["step"] for r in result.history.split("train")] == [4, 8, 9]


def test_throughput_adds_tokens_and_mfu_to_train_rows():
    state, step, batches, _, _ = _setup()
    result = train.fit(state, step, batches, num_steps=4, hooks=[
        train.TrainMetrics(every=2), train.Throughput(tokens_per_step=16, flops_per_step=1e6, peak_flops=1e9)])
    for row in result.history.split("train"):
        assert row["tokens_per_second"] == pytest.approx(16 * row["steps_per_second"])
        assert row["mfu"] == pytest.approx(1e-3 * row["steps_per_second"])


@pytest.mark.parametrize("mode, values, stop_step, best_step", [
    # min: 1.0 (best), 0.95 is not better by more than min_delta=0.1, 0.85 is, then 0.9, 0.8, 0.84: three without.
    ("min", [1.0, 0.95, 0.85, 0.9, 0.8, 0.84, 0.7, 0.6], 6, 3),
    ("max", [0.1, 0.3, 0.35, 0.39, 0.2, 0.45, 0.5, 0.6], 5, 2),
])
def test_early_stopping_counts_rows_without_improvement_and_restores_the_best(tmp_path, mode, values, stop_step,
                                                                             best_step):
    state, step, batches, _, _ = _setup()
    stopper = train.EarlyStopping("loss", mode=mode, patience=3, min_delta=0.1, restore_best=True)
    states = {}
    out = str(tmp_path)
    result = train.fit(state, step, batches, num_steps=len(values), hooks=[
        _Scripted(values), stopper, train.every(1)(lambda loop: states.setdefault(loop.step, loop.state)),
        train.Checkpoint(out, every=100)])
    assert stopper.stopped_step == stop_step and stopper.best_step == best_step
    assert stopper.best == values[best_step - 1]
    assert result.stop_reason.startswith(f"early stopping: eval loss has not improved on {values[best_step - 1]:.6g}")
    # The returned state is the best step's, exactly; the checkpoint holds the last step trained.
    assert int(result.state.step) == best_step
    for x, y in zip(jax.tree.leaves(result.state), jax.tree.leaves(states[best_step])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with checkpoint.CheckpointManager(os.path.join(out, "checkpoints")) as manager:
        assert manager.latest_step() == stop_step


def test_early_stopping_names_a_missing_metric():
    state, step, batches, _, _ = _setup()
    with pytest.raises(KeyError, match=r"EarlyStopping: metric 'accuracy' is not in the eval rows, which have \['loss'\]"):
        train.fit(state, step, batches, num_steps=3, hooks=[_Scripted([1.0] * 3), train.EarlyStopping("accuracy")])


def test_reduce_lr_on_plateau_follows_optax_and_scales_the_updates():
    values = [1.0, 0.9, 0.95, 0.92, 0.91, 0.97, 0.99, 0.5, 0.6, 0.7, 0.8]
    hook = train.ReduceLROnPlateau("loss", factor=0.5, patience=2, cooldown=1)
    tx = optax.chain(optax.sgd(0.1), hook.transform())
    state, step, batches, split, _ = _setup(tx)
    scales = []
    record = train.every(1)(lambda loop: scales.append(hook.scale))
    result = train.fit(state, step, batches, num_steps=len(values), hooks=[_Scripted(values), hook, record])

    # The reference: optax's transform fed the same values, one at a time.
    reference = reduce_on_plateau(factor=0.5, patience=2, cooldown=1)
    plateau = reference.init(jnp.zeros(()))
    want = []
    for value in values:
        _, plateau = reference.update({}, plateau, value=value)
        want.append(float(plateau.scale))
    assert scales == want and want[-1] < 1.0
    # The scale lives in the optimizer state (so checkpoints carry it).
    (node,) = [x for x in jax.tree.leaves(result.state.opt_state, is_leaf=lambda x: isinstance(x, ReduceLROnPlateauState))
               if isinstance(x, ReduceLROnPlateauState)]
    assert float(node.scale) == want[-1]

    # A step under the final scale s moves the parameters s times as far as plain SGD.
    batch = next(data.BatchIterator(split, 16, seed=9))
    plain_state, plain_step, *_ = _setup(optax.sgd(0.1))
    plain_new, _ = plain_step(plain_state.replace(params=result.state.params), batch)
    scaled_new, _ = step(result.state, batch)
    for new, old, ref in zip(jax.tree.leaves(scaled_new.params), jax.tree.leaves(result.state.params),
                             jax.tree.leaves(plain_new.params)):
        np.testing.assert_allclose(np.asarray(new - old), want[-1] * np.asarray(ref - old), rtol=1e-5, atol=1e-7)


def test_reduce_lr_on_plateau_needs_its_transform():
    state, step, batches, _, _ = _setup()
    with pytest.raises(ValueError, match=r"end the optimizer's chain with hook.transform\(\)"):
        train.fit(state, step, batches, num_steps=2, hooks=[_Scripted([1.0, 1.0]), train.ReduceLROnPlateau()])
