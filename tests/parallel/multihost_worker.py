"""One process of the two-process test (run by test_multihost.py, not by pytest).

argv: coordinator port, process id[, checkpoint dir]. Prints ``LOSSES <json>``
and ``GRAIN <json>`` (the record ids of its Grain batches) on success; with a checkpoint dir both processes save the sharded state,
restore it and print ``RESTORED <bool>`` (exact match of their shards).
"""

import json
import os
import sys

# Two devices per process; the test passes its compile flags (if any) in XLA_FLAGS.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

import numpy as np  # noqa: E402

from lepton_jax import checkpoint, data, parallel  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from multihost_common import GRAIN_RECORDS, STEPS, make_problem  # noqa: E402


def main() -> None:
    port, process_id = sys.argv[1], int(sys.argv[2])
    index, count = parallel.initialize(f"localhost:{port}", 2, process_id, timeout_s=60)
    assert (index, count) == (process_id, 2)
    mesh = parallel.make_mesh({"data": -1})  # 2 processes x 2 devices
    model, tx, loss_fn, dataset, batch_size = make_problem()
    batches = data.BatchIterator(dataset, batch_size, seed=0, num_shards=count, shard_index=index)
    local = next(batches)
    assert local["image"].shape[0] == batch_size // count  # this process loads only its rows
    state, shardings = parallel.create_sharded_train_state(model, tx, local["image"], mesh, "data", seed=0)
    step = parallel.make_sharded_train_step(model, tx, loss_fn, mesh, "data", shardings, input_key="image")
    losses = []
    for i in range(STEPS):
        batch = local if i == 0 else next(batches)
        state, metrics = step(state, parallel.global_batch(batch, mesh, "data"))
        losses.append(float(metrics["loss"].addressable_data(0)))
    print("LOSSES " + json.dumps(losses), flush=True)
    # The Grain loader under jax.distributed: this process's part of every global batch.
    loader = data.GrainLoader(data.InMemoryRecords({"id": np.arange(GRAIN_RECORDS)}), batch_size=8, seed=1,
                              num_epochs=1)
    print("GRAIN " + json.dumps([b["id"].tolist() for b in loader]), flush=True)
    if len(sys.argv) > 3:
        with checkpoint.CheckpointManager(sys.argv[3]) as manager:
            manager.save(STEPS, state, extra={"writer": "two processes"})
            manager.wait()
            restored = manager.restore(target=state)
        same = all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
                   for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True)
                   for a, b in zip(x.addressable_shards, y.addressable_shards, strict=True))
        print(f"RESTORED {same}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
