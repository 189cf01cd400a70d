"""ArrayRecord shards and the Grain loader: round trips, global shuffling per
epoch, per-process parts, worker-count independence and exact resume after SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lepton_jax import data
from lepton_jax.data import records as records_lib

N = 96
ARRAYS = {"image": np.random.default_rng(0).normal(size=(N, 8, 8, 1)).astype(np.float32),
          "label": (np.arange(N) % 10).astype(np.int32), "id": np.arange(N)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    data.write_array_records(ARRAYS, out, shards=3)
    return str(out)


def _digests(directory, names):
    return [hashlib.sha256(open(os.path.join(directory, n), "rb").read()).hexdigest() for n in names]


def test_round_trip_metadata_and_identical_rewrites(shards, tmp_path):
    metadata = data.read_metadata(shards)
    assert metadata["records"] == N and metadata["shard_records"] == [32, 32, 32]
    assert metadata["features"] == {"image": {"dtype": "float32", "shape": [8, 8, 1]},
                                    "id": {"dtype": "int64", "shape": []}, "label": {"dtype": "int32", "shape": []}}
    source = data.ArrayRecords(shards)
    for i in (0, 31, 32, 95):
        record = source[i]
        for name, array in ARRAYS.items():
            np.testing.assert_array_equal(record[name], array[i])
            assert np.asarray(record[name]).dtype == array.dtype
    again = tmp_path / "again"
    data.write_array_records(ARRAYS, again, shards=3)
    assert _digests(again, metadata["shards"]) == _digests(shards, metadata["shards"])


def test_each_epoch_reads_every_record_once_in_a_new_order(shards):
    loader = data.GrainLoader(data.ArrayRecords(shards), batch_size=16, seed=5, num_epochs=2)
    batches = [b["id"] for b in loader]
    assert loader.steps_per_epoch == 6 and len(batches) == 12
    first, second = np.concatenate(batches[:6]), np.concatenate(batches[6:])
    assert sorted(first) == sorted(second) == list(range(N))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(N))
    same = [b["id"] for b in data.GrainLoader(data.InMemoryRecords(ARRAYS), batch_size=16, seed=5, num_epochs=2)]
    np.testing.assert_array_equal(np.concatenate(same), np.concatenate(batches))  # in memory: the same stream
    other = [b["id"] for b in data.GrainLoader(data.ArrayRecords(shards), batch_size=16, seed=6, num_epochs=1)]
    assert not np.array_equal(np.concatenate(other), first)
    full = next(data.GrainLoader(data.ArrayRecords(shards), batch_size=16, seed=5))
    np.testing.assert_array_equal(full["image"], ARRAYS["image"][full["id"]])
    np.testing.assert_array_equal(full["label"], ARRAYS["label"][full["id"]])


def test_processes_read_disjoint_parts_of_each_global_batch(shards, monkeypatch):
    single = [b["id"] for b in data.GrainLoader(data.ArrayRecords(shards), batch_size=16, seed=2, num_epochs=1)]
    parts = []
    for index in (0, 1):
        monkeypatch.setattr(records_lib.jax, "process_count", lambda: 2)
        monkeypatch.setattr(records_lib.jax, "process_index", lambda index=index: index)
        loader = data.GrainLoader(data.ArrayRecords(shards), batch_size=16, seed=2, num_epochs=1)
        parts.append([b["id"] for b in loader])
    for step, global_batch in enumerate(single):
        a, b = parts[0][step], parts[1][step]
        assert len(a) == len(b) == 8 and not set(a) & set(b)
        assert sorted(np.concatenate([a, b])) == sorted(global_batch)
    with pytest.raises(ValueError, match=r"GrainLoader: batch_size 15 must be divisible by the number of "
                                         r"processes \(2\)"):
        data.GrainLoader(data.ArrayRecords(shards), batch_size=15)


def test_bad_input_names_the_problem(shards, tmp_path):
    with pytest.raises(ValueError, match=r"write_array_records: every array needs the same number of rows"):
        data.write_array_records({"a": np.zeros(3), "b": np.zeros(4)}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"write_array_records: shards must be an int in \[1, 3\], got 5"):
        data.write_array_records({"a": np.zeros(3)}, tmp_path / "x", shards=5)
    with pytest.raises(FileNotFoundError, match="has no metadata.json"):
        data.ArrayRecords(tmp_path)
    broken = tmp_path / "broken"
    data.write_array_records(ARRAYS, broken, shards=3)
    name = data.read_metadata(broken)["shards"][1]
    with open(broken / name, "r+b") as f:  # overwrite the middle shard's records
        f.seek(40)
        f.write(b"\xff" * 200)
    source = data.ArrayRecords(broken)
    with pytest.raises(ValueError, match=rf"record 32 in shard 1 \(.*{name}\) cannot be read: Corrupted"):
        source[32]  # the first record of shard 1, whose header was overwritten
    np.testing.assert_array_equal(source[33]["id"], 33)  # the rest of the shard still reads
    with pytest.raises(ValueError, match="GrainLoader: the source has 96 records, fewer than one batch of 128"):
        data.GrainLoader(data.ArrayRecords(shards), batch_size=128)
    with pytest.raises(ValueError, match="GrainLoader: num_epochs must be a positive int or None, got 0"):
        data.GrainLoader(data.ArrayRecords(shards), batch_size=16, num_epochs=0)
    with pytest.raises(ValueError, match="GrainLoader: worker_count must be an int >= 0, got -1"):
        data.GrainLoader(data.ArrayRecords(shards), batch_size=16, worker_count=-1)
    with pytest.raises(ValueError, match="RecordWriter: shards must be a positive int, got 0"):
        data.RecordWriter(tmp_path / "w0", shards=0)
    loader = data.GrainLoader(data.ArrayRecords(shards), batch_size=16, seed=1)
    with pytest.raises(ValueError, match=r"GrainLoader.set_state: the state was saved with seed=1, this loader "
                                         r"has seed=2"):
        data.GrainLoader(data.ArrayRecords(shards), batch_size=16, seed=2).set_state(loader.get_state())


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(shards):
    def ids(workers):
        loader = data.GrainLoader(data.ArrayRecords(shards), batch_size=16, seed=4, num_epochs=1,
                                  worker_count=workers)
        return np.concatenate([b["id"] for b in loader])

    np.testing.assert_array_equal(ids(2), ids(0))


_TRAIN = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    from lepton_jax import data, models, optim, train

    records, out, steps, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    loader = data.GrainLoader(data.ArrayRecords(records), batch_size=16, seed=3)
    model = models.MLPClassifier(hidden=(16,))
    tx = optim.adam(1e-2)
    state = train.create_train_state(model, tx, np.zeros((1, 8, 8, 1), np.float32))
    step = train.make_train_step(model, tx, train.classification_loss(), input_key="image")
    log = open(os.path.join(out, "log.jsonl"), "a", buffering=1)

    def logged(state, batch):
        new_state, metrics = step(state, batch)
        number = int(state.step) + 1
        log.write(json.dumps({"step": number, "ids": batch["id"].tolist(), "loss": float(metrics["loss"])}) + "\\n")
        log.flush()
        if number == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return new_state, metrics

    train.fit(state, logged, loader, num_steps=steps, hooks=[train.Checkpoint(out, every=4, resume=resume == "1")])
""")


@pytest.mark.slow
def test_resume_after_sigkill_sees_the_same_batches_and_losses(shards, tmp_path, subprocess_env, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)

    def run(out, kill_at, resume):
        os.makedirs(out, exist_ok=True)
        done = subprocess.run([sys.executable, str(script), shards, str(out), "16", str(kill_at), resume],
                              env=subprocess_env, capture_output=True, text=True, timeout=300)
        with open(out / "log.jsonl") as f:
            return done.returncode, [json.loads(line) for line in f]

    # The uninterrupted run, in this process (the same program and compile flags as the subprocesses).
    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setattr(sys, "argv", [str(script), shards, str(plain), "16", "0", "0"])
    runpy.run_path(str(script), run_name="__main__")
    with open(plain / "log.jsonl") as f:
        uninterrupted = [json.loads(line) for line in f]
    assert [r["step"] for r in uninterrupted] == list(range(1, 17))
    code, killed = run(tmp_path / "killed", 10, "0")
    assert code == -signal.SIGKILL and killed[-1]["step"] == 10
    code, resumed = run(tmp_path / "killed", 0, "1")
    assert code == 0
    after = resumed[len(killed):]
    start = after[0]["step"]
    assert start in (5, 9)  # the latest complete checkpoint before the kill (step 8, or 4 if 8 was unfinished)
    assert [r["step"] for r in after] == list(range(start, 17))
    assert after == uninterrupted[start - 1:]  # the same record ids and the same losses, step by step


def test_record_writer_streams_round_robin_and_reads_back_in_order(tmp_path):
    with data.RecordWriter(tmp_path / "w", shards=3) as writer:
        for i in range(7):
            writer.write({"x": np.full(2, i, np.int32), "id": np.int64(i)})
        metadata = writer.close()
    assert metadata["shard_records"] == [3, 2, 2] and metadata["records"] == 7
    source = data.ArrayRecords(tmp_path / "w")
    assert [int(source[i]["id"]) for i in range(7)] == list(range(7))
    np.testing.assert_array_equal(source[5]["x"], [5, 5])
    with pytest.raises(IndexError, match=r"ArrayRecords: index 7 is outside \[0, 7\)"):
        source[7]
    with pytest.raises(ValueError, match=r"RecordWriter: record 1 has features .*'shape': \[3\].*, the first had"):
        with data.RecordWriter(tmp_path / "bad") as writer:
            writer.write({"x": np.zeros(2)})
            writer.write({"x": np.zeros(3)})
