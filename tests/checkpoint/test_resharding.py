"""Restoring onto other meshes: a GPT state saved with 8-way FSDP comes back
exactly into 2x2 data x tensor, 4-way FSDP, one device and back, with the
shardings the rules give; and on a 1-device machine with no arguments."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lepton_jax import checkpoint, models, parallel, train

CONFIG = models.GPTConfig(vocab_size=48, max_len=16, num_layers=1, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64)
EXAMPLE = np.zeros((8, 16), np.int32)


def _setup():
    model = models.GPT(CONFIG)
    tx = optax.adamw(1e-3)
    return model, tx


def _saved(tmp_path):
    model, tx = _setup()
    mesh = parallel.make_mesh({"fsdp": 8})
    state, _ = parallel.create_sharded_train_state(model, tx, EXAMPLE, mesh, "fsdp", seed=0)
    # Move off the init values so a restore of the wrong array cannot pass.
    state = state.replace(params=jax.tree.map(lambda p: p * 1.5 + 0.25, state.params), step=jnp.asarray(11))
    assert state.params["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    with checkpoint.CheckpointManager(tmp_path) as m:
        m.save(11, state, logical_axes=parallel.param_logical_axes(model, EXAMPLE))
    return state


def _assert_same_values(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.dtype == y.dtype


def _assert_shardings(state, mesh, rules):
    model, tx = _setup()
    want = parallel.state_shardings(model, tx, EXAMPLE, mesh, rules)
    for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(want), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.shape, leaf.sharding, sharding)


@pytest.mark.parametrize("axes, rules", [({"data": 2, "tensor": 2}, "tensor"), ({"fsdp": 4}, "fsdp"),
                                         ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tensor")])
def test_fsdp8_restores_onto_other_meshes_exactly(tmp_path, axes, rules):
    saved = _saved(tmp_path / "a")
    devices = jax.devices()[:int(np.prod(list(axes.values())))]
    mesh = parallel.make_mesh(axes, devices=devices)
    model, tx = _setup()
    target = jax.eval_shape(lambda: train.create_train_state(model, tx, EXAMPLE))
    restored = checkpoint.restore(tmp_path / "a", target=target, mesh=mesh, rules=rules)
    assert isinstance(restored, train.TrainState)
    _assert_same_values(restored, saved)
    _assert_shardings(restored, mesh, rules)
    # Without a target: the saved tree as dicts, sharded the same way.
    as_dict = checkpoint.restore(tmp_path / "a", mesh=mesh, rules=rules)
    assert as_dict["params"]["block_0"]["attention"]["query"].sharding.is_equivalent_to(
        restored.params["block_0"]["attention"]["query"].sharding, 3)
    # And back: saved from this mesh, restored onto 8-way FSDP through a target that carries shardings.
    with checkpoint.CheckpointManager(tmp_path / "b") as m:
        m.save(11, restored, logical_axes=parallel.param_logical_axes(model, EXAMPLE))
    fsdp8 = parallel.make_mesh({"fsdp": 8})
    shardings = parallel.state_shardings(model, tx, EXAMPLE, fsdp8, "fsdp")
    sharded_target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    back = checkpoint.restore(tmp_path / "b", target=sharded_target)
    _assert_same_values(back, saved)
    _assert_shardings(back, fsdp8, "fsdp")


def test_fsdp8_restores_onto_one_device(tmp_path):
    saved = _saved(tmp_path)
    restored = checkpoint.restore(tmp_path)
    assert all(leaf.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0]) for leaf in jax.tree.leaves(restored))
    _assert_same_values(restored["params"], saved.params)
    one = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    _assert_same_values(checkpoint.restore(tmp_path, mesh=one, rules="fsdp")["params"], saved.params)


def test_indivisible_restore_names_the_array(tmp_path):
    _saved(tmp_path)
    mesh = parallel.make_mesh({"tensor": 8})  # 2 kv heads cannot split 8 ways
    with pytest.raises(ValueError, match=r"'[a-z_/0-9]*block_0/attention/key' has shape \(32, 2, 8\).*does not divide 2"):
        checkpoint.restore(tmp_path, mesh=mesh, rules="tensor")


def test_restore_on_a_one_device_machine_without_arguments(tmp_path, subprocess_env):
    saved = _saved(tmp_path)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from lepton_jax import checkpoint
        assert jax.device_count() == 1
        tree = checkpoint.restore({str(tmp_path)!r})
        np.savez({str(tmp_path / "one.npz")!r}, *[np.asarray(x) for x in jax.tree.leaves(tree["params"])])
    """)
    env = subprocess_env
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    one = np.load(tmp_path / "one.npz")
    for i, leaf in enumerate(jax.tree.leaves(saved.params)):
        np.testing.assert_array_equal(one[f"arr_{i}"], np.asarray(leaf))
