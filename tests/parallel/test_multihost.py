"""Two processes on localhost (jax.distributed, gloo CPU collectives) train
data-parallel on per-process shards and report the losses one process gets
on the same global batches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lepton_jax import checkpoint, data, train

sys.path.insert(0, os.path.dirname(__file__))
from multihost_common import GRAIN_RECORDS, STEPS, make_problem  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_and_share_a_checkpoint(tmp_path, subprocess_env):
    port = _free_port()
    env = subprocess_env
    ckpt = str(tmp_path / "ckpt")
    workers = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), ckpt], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outputs = []
    try:
        for worker in workers:
            out, err = worker.communicate(timeout=240)
            assert worker.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for worker in workers:
            worker.kill()
    losses = [json.loads(next(line for line in out.splitlines() if line.startswith("LOSSES "))[7:])
              for out in outputs]
    assert losses[0] == losses[1]  # both processes see the same replicated loss

    # GrainLoader: each process read its half of every global batch; together, the one-process batches.
    grain = [json.loads(next(line for line in out.splitlines() if line.startswith("GRAIN "))[6:]) for out in outputs]
    single = [b["id"].tolist() for b in data.GrainLoader(data.InMemoryRecords({"id": np.arange(GRAIN_RECORDS)}),
                                                           batch_size=8, seed=1, num_epochs=1)]
    assert len(grain[0]) == len(grain[1]) == len(single) == GRAIN_RECORDS // 8
    for first, second, whole in zip(*grain, single):
        assert len(first) == len(second) == 4 and not set(first) & set(second)
        assert sorted(first + second) == sorted(whole)

    model, tx, loss_fn, dataset, batch_size = make_problem()
    batches = data.BatchIterator(dataset, batch_size, seed=0)
    state = train.create_train_state(model, tx, dataset["image"][:1], seed=0)
    step = train.make_train_step(model, tx, loss_fn, input_key="image")
    expected = []
    for _ in range(STEPS):
        state, metrics = step(state, next(batches))
        expected.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], expected, rtol=2e-5)

    # Both processes saved one sharded state and read their shards back exactly.
    assert all("RESTORED True" in out for out in outputs)
    restored = checkpoint.restore(ckpt)  # here: one process, every array whole on device 0
    assert int(restored["step"]) == STEPS
    for got, want in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    with checkpoint.CheckpointManager(ckpt) as manager:
        assert manager.extra() == {"writer": "two processes"}
