"""Faults: a SIGTERM mid-run saves and resumes to exactly the losses of an
uninterrupted run; a SIGKILL mid-save leaves the last complete checkpoint
readable and exact."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lepton_jax import checkpoint

pytestmark = pytest.mark.slow

WORKER = os.path.join(os.path.dirname(__file__), "fault_worker.py")


def _train_losses(out: str) -> list[float]:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r["loss"] for r in rows if r["split"] == "train"]


def _wait_for(process: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith(prefix):
            return line
    raise AssertionError(f"worker never printed {prefix!r}; stderr: {process.stderr.read()[-3000:]}")


def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path, subprocess_env):
    steps = 30
    full = subprocess.run([sys.executable, WORKER, "train", str(tmp_path / "full"), str(steps)], env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0 and "DONE" in full.stdout, full.stderr[-3000:]

    out = str(tmp_path / "cut")
    worker = subprocess.Popen([sys.executable, WORKER, "train", out, str(steps), "--paced"], env=subprocess_env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(worker, "STEP 9")
        worker.send_signal(signal.SIGTERM)
        line = _wait_for(worker, "PREEMPTED")
        assert worker.wait(timeout=60) == 0  # a clean exit, not death by signal
    finally:
        worker.kill()
    stopped = int(line.split()[1])
    assert 9 <= stopped < steps
    with checkpoint.CheckpointManager(os.path.join(out, "checkpoints")) as manager:
        assert manager.all_steps() == [stopped]
    resumed = subprocess.run([sys.executable, WORKER, "train", out, str(steps), "--resume"], env=subprocess_env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "DONE" in resumed.stdout, resumed.stderr[-3000:]
    assert _train_losses(out) == _train_losses(str(tmp_path / "full"))  # bitwise: same keys, data and state


def test_sigkill_during_save_keeps_the_last_complete_step(tmp_path, subprocess_env):
    directory = str(tmp_path / "ckpt")
    worker = subprocess.Popen([sys.executable, WORKER, "save", directory], env=subprocess_env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    reported = 0
    try:
        reported = int(_wait_for(worker, "SAVED").split()[1])
        time.sleep(random.uniform(0.0, 1.5))  # lands somewhere inside a later save
        worker.kill()
        worker.wait(timeout=30)
        reported = max([reported] + [int(line.split()[1]) for line in worker.stdout if line.startswith("SAVED")])
    finally:
        worker.kill()
    restored = checkpoint.restore(directory)
    step = int(np.asarray(restored["a"])[0, 0])
    assert step >= reported  # a step it reported (or a later one that finished before the kill)
    np.testing.assert_array_equal(np.asarray(restored["a"]), np.full((4096, 2048), float(step)))
    np.testing.assert_array_equal(np.asarray(restored["b"]), np.full((2048, 2048), step, np.int32))
    with checkpoint.CheckpointManager(directory) as manager:
        assert manager.latest_step() == step


def test_process_exit_finishes_an_async_save(tmp_path, subprocess_env):
    directory = str(tmp_path / "ckpt")
    out = subprocess.run([sys.executable, WORKER, "exit", directory], env=subprocess_env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "RETURNED" in out.stdout, out.stderr[-3000:]
    np.testing.assert_array_equal(np.asarray(checkpoint.restore(directory)["a"]), np.full((4096, 4096), 5.0))
