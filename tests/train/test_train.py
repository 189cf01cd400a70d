"""The train harness: steps against hand-built references, determinism, exact resume."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import chex
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax import data, models, nn, ops, train


def _tiny_data(n: int = 96, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    # A learnable rule: the label is the quadrant holding the brightest pixel.
    flat = images.reshape(n, -1).argmax(-1)
    rows, cols = flat // 8, flat % 8
    labels = (2 * (rows >= 4) + (cols >= 4)).astype(np.int32)
    return {"image": images, "label": labels}


def _cnn_setup(seed: int = 0):
    model = models.CNN(num_classes=4, channels=(4, 8), hidden=16)
    tx = optax.adamw(1e-2)
    example = jnp.zeros((1, 8, 8, 1), jnp.float32)
    state = train.create_train_state(model, tx, example, seed=seed)
    loss_fn = train.classification_loss(label_smoothing=0.1)
    augment = lambda key, x: data.random_translate(key, x, max_shift=1)  # noqa: E731
    step = train.make_train_step(model, tx, loss_fn, input_key="image", augment_fn=augment)
    return model, tx, state, loss_fn, step


def test_train_step_matches_hand_built_update():
    """One step equals grad of the loss by hand, then optax by hand."""

    class TwoLayer(linen.Module):
        @linen.compact
        def __call__(self, x, *, train=False):
            return nn.Dense(3)(jax.nn.tanh(nn.Dense(5)(x)))

    model, tx = TwoLayer(), optax.sgd(0.1, momentum=0.9)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    y = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    state = train.create_train_state(model, tx, x, seed=3)
    step = train.make_train_step(model, tx, train.classification_loss(), input_key="x")
    new_state, metrics = step(state, {"x": x, "label": y})

    def reference_loss(params):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(reference_loss)(state.params)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, updates)
    chex.assert_trees_all_close(new_state.params, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-6)
    assert int(new_state.step) == 1


def test_custom_layer_and_custom_loss_plug_into_the_same_step():
    """A user-defined module (with its own parameter) and a user-defined loss
    train through ``make_train_step`` next to lepton_jax layers."""

    class Gated(linen.Module):  # user layer: x * sigmoid(g) with a learned gate g
        @linen.compact
        def __call__(self, x):
            gate = self.param("gate", linen.initializers.zeros, (x.shape[-1],))
            return x * jax.nn.sigmoid(gate)

    class Model(linen.Module):
        @linen.compact
        def __call__(self, x, *, train=False):
            h = Gated()(nn.Dense(16)(x.reshape(x.shape[0], -1)))
            h = nn.Dropout(0.1)(jax.nn.relu(h), deterministic=not train)
            return nn.Dense(4)(h)

    def hinge_loss(logits, batch):  # user loss: multiclass hinge
        labels = batch["label"]
        correct = jnp.take_along_axis(logits, labels[:, None], axis=-1)
        margins = jnp.maximum(0.0, 1.0 + logits - correct).at[jnp.arange(len(labels)), labels].set(0.0)
        return margins.sum(-1).mean(), {"accuracy": ops.accuracy(logits, labels)}

    batch = _tiny_data(64)
    model, tx = Model(), optax.adam(1e-2)
    state = train.create_train_state(model, tx, batch["image"], seed=0)
    step = train.make_train_step(model, tx, hinge_loss, input_key="image", regularizer=lambda p: 1e-4 * ops.l2_penalty(p))
    first = None
    for _ in range(60):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < 0.3 * first
    assert "penalty" in metrics and float(metrics["penalty"]) > 0
    # The user's parameter was trained, not left at its initial zeros.
    assert float(jnp.abs(state.params["Gated_0"]["gate"]).max()) > 0


def test_loss_sees_the_augmented_inputs_the_model_saw():
    """A loss that reads the inputs (a distillation teacher) gets the augmented ones."""

    class Linear(linen.Module):
        @linen.compact
        def __call__(self, x, *, train=False):
            return nn.Dense(3)(x)

    model = Linear()
    batch = _tiny_data(8)
    tx = optax.sgd(0.1)
    state = train.create_train_state(model, tx, batch["image"].reshape(8, -1), seed=0)
    flat = {"image": batch["image"].reshape(8, -1), "label": batch["label"]}

    def loss_fn(outputs, b):  # the outputs must be the model of b["image"]
        expected = model.apply({"params": state.params}, b["image"])
        return jnp.mean(outputs), {"gap": jnp.abs(outputs - expected).max(), "seen": b["image"].sum()}

    step = train.make_train_step(model, tx, loss_fn, input_key="image", augment_fn=lambda key, x: 2.0 * x + 1.0)
    _, metrics = step(state, flat)
    assert float(metrics["gap"]) < 1e-5
    np.testing.assert_allclose(float(metrics["seen"]), float((2.0 * flat["image"] + 1.0).sum()), rtol=1e-5)


def test_same_seed_gives_bitwise_identical_params():
    batch_data = _tiny_data()

    def run(seed):
        *_, state, _, step = _cnn_setup(seed)
        batches = data.BatchIterator(batch_data, 16, seed=seed)
        for _ in range(8):
            state, _ = step(state, next(batches))
        return state

    a, b, c = run(0), run(0), run(1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(c.params)))


def test_batch_norm_statistics_are_carried_in_the_state():
    *_, state, _, step = _cnn_setup()
    before = jax.tree.map(np.asarray, state.model_state["batch_stats"])
    state, _ = step(state, _tiny_data(16))
    after = state.model_state["batch_stats"]
    changed = [not np.allclose(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
    assert all(changed)


def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path):
    split = _tiny_data()
    steps = 12  # 2N with N = 6, two 6-step epochs of 16

    def fresh():
        model, tx, state, loss_fn, step = _cnn_setup()
        return state, step, data.BatchIterator(split, 16, seed=5)

    state, step, batches = fresh()
    full = train.fit(state, step, batches, num_steps=steps, hooks=train.default_hooks(log_every=1, progress=False))

    out = str(tmp_path / "run")
    state, step, batches = fresh()
    first = train.fit(state, step, batches, num_steps=steps // 2, hooks=train.default_hooks(
        out, log_every=1, checkpoint_every=steps // 2, progress=False, tensorboard=False, plot=False))
    assert first.resumed_from is None
    state, step, batches = fresh()  # a new process would start from scratch like this
    second = train.fit(state, step, batches, num_steps=steps, hooks=train.default_hooks(
        out, log_every=1, resume=True, progress=False, tensorboard=False, plot=False))
    assert second.resumed_from == steps // 2

    def losses(history):
        return [row["loss"] for row in history if row["split"] == "train"]

    assert losses(first.history) + losses(second.history) == losses(full.history)
    for x, y in zip(jax.tree.leaves(second.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fit_logs_jsonl_tensorboard_plot_and_evaluates(tmp_path):
    split = _tiny_data(80)
    model, tx, state, loss_fn, step = _cnn_setup()
    eval_step = train.make_eval_step(model, loss_fn, num_classes=4, input_key="image")
    out = str(tmp_path / "run")
    result = train.fit(state, step, data.BatchIterator(split, 16), epochs=2, hooks=train.default_hooks(
        out, eval_step=eval_step, eval_data=split, eval_batch_size=32, log_every=2, progress=False))
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4, 6, 8, 10]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [5, 10]
    assert os.listdir(os.path.join(out, "tensorboard"))
    with open(os.path.join(out, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert result.eval_metrics["num_examples"] == 80
    assert set(os.listdir(os.path.join(out, "checkpoints"))) >= {"5", "10"}


_LOG_SCALARS = """
import sys
from lepton_jax.train.logging import MetricLogger

logger = MetricLogger(sys.argv[1])
logger.log(3, "train", {"loss": 1.5, "accuracy": 0.25})
logger.log(5, "eval", {"loss": 2.0})
logger.close()
print("torch in sys.modules:", "torch" in sys.modules)  # neither imported nor left blocked
"""


def _tfrecords(path):
    """The records of a TFRecord file (length, its CRC, data, its CRC)."""
    with open(path, "rb") as f:
        blob = f.read()
    at = 0
    while at < len(blob):
        (length,) = struct.unpack("<Q", blob[at:at + 8])
        yield blob[at + 12:at + 12 + length]
        at += 12 + length + 4


def test_tensorboard_scalars_are_written_without_importing_torch(tmp_path, subprocess_env):
    from tensorboardX.proto import event_pb2

    done = subprocess.run([sys.executable, "-c", _LOG_SCALARS, str(tmp_path)], env=subprocess_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch in sys.modules: False" in done.stdout
    [name] = os.listdir(tmp_path / "tensorboard")
    scalars = []
    for record in _tfrecords(tmp_path / "tensorboard" / name):
        event = event_pb2.Event.FromString(record)
        scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    assert sorted(scalars) == [(3, "train/accuracy", 0.25), (3, "train/loss", 1.5), (5, "eval/loss", 2.0)]


def test_evaluate_over_padded_batches_equals_whole_dataset():
    split = _tiny_data(70)
    model, tx, state, loss_fn, _ = _cnn_setup()
    eval_step = train.make_eval_step(model, loss_fn, num_classes=4, input_key="image", top_k=(1, 2))
    got = train.evaluate(state, eval_step, data.iterate_once(split, 32, pad=True))  # 32 + 32 + 6 padded

    logits = model.apply(state.variables(), jnp.asarray(split["image"]), train=False)
    per_example = optax.smooth_labels(jax.nn.one_hot(split["label"], 4), 0.1)
    expected_loss = optax.softmax_cross_entropy(logits, per_example).mean()
    predictions = np.asarray(logits).argmax(-1)
    np.testing.assert_allclose(got["loss"], expected_loss, rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], np.mean(predictions == split["label"]), rtol=1e-6)
    assert got["num_examples"] == 70
    assert np.asarray(got["confusion"]).sum() == 70


def test_bad_input_raises_clear_errors():
    model, tx, state, loss_fn, step = _cnn_setup()
    batch = _tiny_data(8)
    with pytest.raises(ValueError, match="batch has no entry 'image'"):
        step(state, {"pixels": batch["image"], "label": batch["label"]})
    with pytest.raises(TypeError, match="batch must be a mapping"):
        step(state, (batch["image"], batch["label"]))
    with pytest.raises(ValueError, match=r"random_translate: images must have rank 4.*\(8, 64\)"):
        step(state, {"image": batch["image"].reshape(8, 64), "label": batch["label"]})
    plain_step = train.make_train_step(model, tx, loss_fn, input_key="image")
    with pytest.raises(ValueError, match=r"CNN: x must have rank 4.*\(8, 64\)"):
        plain_step(state, {"image": batch["image"].reshape(8, 64), "label": batch["label"]})
    bad_loss = train.make_train_step(model, tx, lambda logits, b: logits.sum(-1), input_key="image")
    with pytest.raises(ValueError, match="scalar loss, got shape"):
        bad_loss(state, batch)
    batches = data.BatchIterator(batch, 4)
    with pytest.raises(ValueError, match="exactly one of num_steps and epochs"):
        train.fit(state, step, batches, num_steps=2, epochs=1)
    with pytest.raises(TypeError, match=r"data must be an iterator of batches .*, got list"):
        train.fit(state, step, [batch], num_steps=2)
    with pytest.raises(TypeError, match="hooks must be train.Hook objects or callables fn\\(loop\\), got int"):
        train.fit(state, step, batches, num_steps=2, hooks=[3])
    with pytest.raises(ValueError, match="log_every must be a positive int, got 0"):
        train.default_hooks(log_every=0)
    with pytest.raises(ValueError, match="TrainMetrics: every must be a positive int, got 2.5"):
        train.TrainMetrics(every=2.5)
    with pytest.raises(ValueError, match="need an output_dir"):
        train.default_hooks(resume=True)
    with pytest.raises(ValueError, match="EarlyStopping: mode must be 'min' or 'max', got 'lowest'"):
        train.EarlyStopping("loss", mode="lowest")
    with pytest.raises(ValueError, match="EarlyStopping: patience must be a positive int, got 0"):
        train.EarlyStopping("loss", patience=0)
    with pytest.raises(ValueError, match="Evaluate: batch_size must be a positive int, got -4"):
        train.Evaluate(step, batch, batch_size=-4)
    with pytest.raises(ValueError, match="ReduceLROnPlateau: mode must be 'min' or 'max', got 'up'"):
        train.ReduceLROnPlateau("loss", mode="up")
