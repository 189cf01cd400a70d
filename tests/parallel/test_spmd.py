"""SPMD on 8 simulated CPU devices: every mesh and rules preset trains like one
device; shard_map and pmap paths equal the jit path; FSDP shards the state."""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from lepton_jax import models, parallel, train

STEPS = 5
# fp32; sharded matmuls and gradient reductions sum in another order.
RTOL = 2e-5


def _gpt_setup():
    # One block holds every kind of parameter the rules shard; a second adds compile time only.
    config = models.GPTConfig(vocab_size=64, max_len=16, num_layers=1, num_heads=4, num_kv_heads=2, d_model=32,
                              d_ff=64, positions="rotary", mlp="swiglu")
    model = models.GPT(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(STEPS, 16, 17)).astype(np.int32)
    batches = [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]
    return model, models.lm_loss, "inputs", batches


def _mlp_setup():
    model = models.MLPClassifier(num_classes=8, hidden=(32, 16), dropout_rate=0.0)
    rng = np.random.default_rng(1)
    batches = [{"image": rng.normal(size=(16, 4, 4, 1)).astype(np.float32),
                "label": rng.integers(0, 8, 16).astype(np.int32)} for _ in range(STEPS)]
    return model, train.classification_loss(), "image", batches


SETUPS = {"gpt": _gpt_setup, "mlp": _mlp_setup}
TX = optax.adamw(1e-2, weight_decay=0.01)


@functools.lru_cache(maxsize=None)  # one reference run per setup, shared by the meshes compared with it
def _single_device_losses(name):
    model, loss_fn, key, batches = SETUPS[name]()
    state = train.create_train_state(model, TX, batches[0][key], seed=0)
    step = train.make_train_step(model, TX, loss_fn, input_key=key)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "mlp"])
@pytest.mark.parametrize("axes, rules", [
    ({"data": 8}, "data"),
    ({"data": 1, "fsdp": 8}, "fsdp"),
    ({"data": 4, "tensor": 2}, "tensor"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tensor"),
])
def test_meshes_match_one_device(name, axes, rules):
    expected, reference_state = _single_device_losses(name)
    model, loss_fn, key, batches = SETUPS[name]()
    mesh = parallel.make_mesh(axes)
    state, shardings = parallel.create_sharded_train_state(model, TX, batches[0][key], mesh, rules, seed=0)
    step = parallel.make_sharded_train_step(model, TX, loss_fn, mesh, rules, shardings, input_key=key)
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch(batch, mesh, rules))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, expected, rtol=RTOL)
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params)):
        # Adam divides by sqrt(nu): rounding in small gradients (summed in another
        # order on each mesh, and per CPU vector width) moves params by ~lr * 1e-3.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=5e-5)
    # The state keeps the shardings the rules give it.
    for leaf, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(shardings.params)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_shard_map_and_pmap_paths_equal_the_jit_path(name):
    expected, _ = _single_device_losses(name)
    model, loss_fn, key, batches = SETUPS[name]()
    mesh = parallel.make_mesh({"data": -1})
    state = train.create_train_state(model, TX, batches[0][key], seed=0)

    shard_map_step = parallel.make_shard_map_train_step(model, TX, loss_fn, mesh, input_key=key)
    s, losses = state, []
    for batch in batches:
        s, metrics = shard_map_step(s, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, expected, rtol=RTOL)

    pmap_step = parallel.make_pmap_train_step(model, TX, loss_fn, input_key=key)
    s, losses = parallel.replicate(state), []
    for batch in batches:
        s, metrics = pmap_step(s, parallel.split_for_pmap(batch))
        per_device = np.asarray(metrics["loss"])
        assert np.all(per_device == per_device[0])  # pmean: every device agrees
        losses.append(float(per_device[0]))
    np.testing.assert_allclose(losses, expected, rtol=RTOL)


def _bytes_on_device0(tree):
    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


def test_fsdp_shards_params_and_optimizer_state():
    model, loss_fn, key, batches = _gpt_setup()
    mesh = parallel.make_mesh({"fsdp": 8})
    state, _ = parallel.create_sharded_train_state(model, TX, batches[0][key], mesh, "fsdp")
    total = sum(leaf.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state)))
    per_device = _bytes_on_device0((state.params, state.opt_state))
    assert per_device <= total / 7, (per_device, total)


def test_parameter_shardings_follow_the_rules():
    model, loss_fn, key, batches = _gpt_setup()
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = parallel.state_shardings(model, TX, batches[0][key], mesh, "fsdp_tensor")
    block = shardings.params["block_0"]
    assert block["mlp"]["w_in"].spec == P("fsdp", "tensor")  # (embed, mlp)
    assert block["mlp"]["w_out"].spec == P("tensor", "fsdp")  # (mlp, embed): row split
    assert block["attention"]["query"].spec == P("fsdp", "tensor", None)  # (embed, heads, head_dim)
    assert block["attention"]["out"].spec == P("tensor", None, "fsdp")
    assert shardings.params["embedding"].spec == P("tensor", "fsdp")  # (vocab, embed)
    # Adam's moments follow their parameters; the step count is replicated.
    adam_state = shardings.opt_state[0]
    assert adam_state.mu["block_0"]["mlp"]["w_in"].spec == P("fsdp", "tensor")
    assert adam_state.count.spec == P()
    assert parallel.batch_sharding(mesh, "fsdp_tensor").spec == P(("data", "fsdp"), None)
    # Mesh axes absent from the mesh are dropped: the same preset on a data-only mesh.
    data_mesh = parallel.make_mesh({"data": 8})
    assert parallel.state_shardings(model, TX, batches[0][key], data_mesh,
                                    "fsdp_tensor").params["embedding"].spec == P(None, None)


def test_make_mesh_resolves_and_explains():
    mesh = parallel.make_mesh({"data": -1, "fsdp": 2, "tensor": 1})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert "data=4" in parallel.describe_mesh(mesh)
    with pytest.raises(ValueError, match=r"the 8 mesh devices do not divide by the fixed axes .* \(product 3\)"):
        parallel.make_mesh({"data": -1, "tensor": 3})
    with pytest.raises(ValueError, match=r"multiply to 4, but there are 8 devices"):
        parallel.make_mesh({"data": 2, "tensor": 2})
    with pytest.raises(ValueError, match=r"at most one mesh axis may be -1"):
        parallel.make_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match=r"dcn names axes \['pipeline'\] that are not in axes"):
        parallel.make_mesh({"data": -1}, dcn={"pipeline": 2})
    model, _, key, batches = _gpt_setup()  # 2 kv heads cannot split 4 ways
    with pytest.raises(ValueError, match=r"\['key'\] axis 'kv_heads' has size 2, which mesh axes \('tensor',\) \(4 ways\)"):
        parallel.state_shardings(model, TX, batches[0][key], parallel.make_mesh({"data": 2, "tensor": 4}), "tensor")
    with pytest.raises(ValueError, match=r"unknown preset 'zero'"):
        parallel.get_rules("zero")
    with pytest.raises(ValueError, match=r"batch\['x'\] has 6 rows, not divisible by 8 devices"):
        parallel.split_for_pmap({"x": np.ones((6, 2))})


def test_initialize_rejects_partial_arguments(monkeypatch):
    for name in ("LEPTON_COORDINATOR", "LEPTON_NUM_PROCESSES", "LEPTON_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="give coordinator_address, num_processes and process_id together"):
        parallel.initialize("localhost:1234", 2)
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got 5"):
        parallel.initialize("localhost:1234", 2, 5)
    monkeypatch.setenv("LEPTON_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="LEPTON_NUM_PROCESSES must be an integer, got 'two'"):
        parallel.initialize()
