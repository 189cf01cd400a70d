"""A Flax NNX model, written as the NNX docs write one, trained, evaluated
and exported through lepton_jax's linen-based machinery."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from lepton_jax import data, train
from lepton_jax.export import export_model, load
from lepton_jax.nnx import NNXModel
from recipes import digits

pytestmark = pytest.mark.slow  # trains a CNN to its accuracy bar


class CNN(nnx.Module):
    """The NNX docs' MNIST CNN, sized for 8x8 digits (BatchNorm and dropout added)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm = nnx.BatchNorm(32, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.dropout = nnx.Dropout(0.25, rngs=rngs)
        self.linear1 = nnx.Linear(2 * 2 * 64, 128, rngs=rngs)
        self.linear2 = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.batch_norm(self.conv1(x))), window_shape=(2, 2), strides=(2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = self.dropout(nnx.relu(self.linear1(x.reshape(x.shape[0], -1))))
        return self.linear2(x)


def test_an_nnx_cnn_trains_with_fit_and_exports(tmp_path):
    train_split, _, test_split, _ = digits.load_splits(0)  # the digits recipe's splits, normalized
    module = CNN(rngs=nnx.Rngs(0))
    tx = optax.adamw(3e-3)
    # The nnx.Module itself goes to lepton_jax's state and step builders.
    state = train.create_train_state(module, tx, train_split["image"][:1], seed=0)
    assert set(state.model_state) == {"batch_stats"}
    loss = train.classification_loss()
    step = train.make_train_step(module, tx, loss, input_key="image")
    eval_step = train.make_eval_step(module, loss, input_key="image", num_classes=10)
    result = train.fit(state, step, data.BatchIterator(train_split, 64, seed=0), epochs=12,
                       hooks=[train.Evaluate(eval_step, test_split, every=None)])
    accuracy = float(result.eval_metrics["accuracy"])
    print(f"NNX CNN test accuracy {accuracy:.4f}")
    assert accuracy >= 0.98, accuracy
    # BatchNorm's running statistics moved; dropout differed between steps (train mode) but not in eval.
    initial = NNXModel.wrap(module).init()
    assert not np.allclose(result.state.model_state["batch_stats"]["batch_norm"]["mean"],
                           initial["batch_stats"]["batch_norm"]["mean"])

    model = NNXModel.wrap(module)
    variables = result.state.variables()
    path = export_model(tmp_path / "nnx_cnn", lambda v, x: model.apply(v, x), variables,
                        test_split["image"][:1], platforms=("cpu",), output_names=("logits",))
    served = np.asarray(load(path)(test_split["image"]))
    np.testing.assert_allclose(served, np.asarray(jax.jit(model.apply)(variables, test_split["image"])),
                               rtol=1e-5, atol=1e-5)
    assert (served.argmax(1) == test_split["label"]).mean() == pytest.approx(accuracy)
    # And the server answers from it (the app in process, its lifespan run by the test client).
    from starlette.testclient import TestClient

    from lepton_jax.serve import create_app

    with TestClient(create_app([str(tmp_path / "nnx_cnn")], max_batch=8)) as client:
        answer = client.post("/v1/models/nnx_cnn:predict", json={"instances": test_split["image"][:3].tolist()})
    assert answer.status_code == 200
    np.testing.assert_allclose(answer.json()["predictions"], served[:3], rtol=1e-5, atol=1e-5)


class MLP(nnx.Module):
    """Kernels named with logical axes (nnx.with_partitioning), for the sharding rules."""

    def __init__(self, *, rngs: nnx.Rngs):
        named = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
        self.hidden = nnx.Linear(64, 128, kernel_init=named, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))))


def _mlp() -> MLP:
    with nnx.use_eager_sharding(False):  # names kept as metadata; lepton_jax's rules place the arrays
        return MLP(rngs=nnx.Rngs(0))


def test_fsdp_on_8_devices_matches_one_device(tmp_path):
    from lepton_jax import parallel

    train_split = digits.load_splits(0)[0]
    batches = [{"image": train_split["image"][i:i + 32], "label": train_split["label"][i:i + 32]}
               for i in range(0, 96, 32)]
    tx, loss = optax.adam(1e-2), train.classification_loss()
    state = train.create_train_state(_mlp(), tx, batches[0]["image"], seed=0)
    step = train.make_train_step(_mlp(), tx, loss, input_key="image")
    expected = []
    for batch in batches:
        state, metrics = step(state, batch)
        expected.append(float(metrics["loss"]))

    mesh = parallel.make_mesh({"fsdp": 8})
    assert tuple(parallel.param_logical_axes(_mlp(), batches[0]["image"])["hidden"]["kernel"]) == ("embed", "mlp")
    sharded, shardings = parallel.create_sharded_train_state(_mlp(), tx, batches[0]["image"], mesh, "fsdp", seed=0)
    sharded_step = parallel.make_sharded_train_step(_mlp(), tx, loss, mesh, "fsdp", shardings, input_key="image")
    losses = []
    for batch in batches:
        sharded, metrics = sharded_step(sharded, parallel.shard_batch(batch, mesh, "fsdp"))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    kernel = sharded.params["hidden"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp" and not kernel.sharding.is_fully_replicated
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 sharded.params, state.params)
    # Saved under FSDP on 8 devices, restored onto another mesh by the saved logical axes.
    from lepton_jax import checkpoint

    with checkpoint.CheckpointManager(tmp_path / "ckpt", async_save=False) as manager:
        manager.save(3, sharded, logical_axes=parallel.param_logical_axes(_mlp(), batches[0]["image"]))
    other = parallel.make_mesh({"data": 2, "fsdp": 4})
    restored = checkpoint.restore(tmp_path / "ckpt", mesh=other, rules="fsdp")
    kernel = restored["params"]["hidden"]["kernel"]
    assert kernel.sharding.mesh.shape == other.shape and kernel.sharding.spec[0] == "fsdp"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored["params"], sharded.params)


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    import shutil

    train_split = digits.load_splits(0)[0]
    tx, loss = optax.adam(3e-3), train.classification_loss()

    def run(out, **checkpoint):
        module = _mlp()
        state = train.create_train_state(module, tx, train_split["image"][:1], seed=0)
        step = train.make_train_step(module, tx, loss, input_key="image")
        return train.fit(state, step, data.BatchIterator(train_split, 32, seed=0), num_steps=10,
                         hooks=[train.Checkpoint(str(out), every=5, **checkpoint)])

    whole = run(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "10")  # as if stopped after step 5
    resumed = run(tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 5
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 resumed.state.params, whole.state.params)
