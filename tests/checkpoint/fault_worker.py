"""Child process for test_faults.py (run as a script, not by pytest).

``train OUT STEPS [--resume] [--paced]``: fits a small classifier with
dropout, one logged row per step, printing ``STEP n`` after each step;
``--paced`` slows each step down so a signal sent on ``STEP n`` lands mid-run
(the runs that are not signalled go at full speed). Prints ``PREEMPTED n`` or
``DONE`` at the end.

``exit DIR``: starts an asynchronous save of ~64 MB and exits at once,
without ``wait``/``close``: the exit hook must finish the write.

``save DIR``: saves a ~64 MB state whose every element equals the step,
again and again, printing ``SAVED n`` once step ``n`` is on disk.
"""

import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "")  # one device, whatever the parent simulates

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from lepton_jax import checkpoint, data, models, train  # noqa: E402


def run_train(out: str, steps: int, resume: bool, paced: bool) -> None:
    rng = np.random.default_rng(0)
    dataset = {"image": rng.normal(size=(96, 4, 4, 1)).astype(np.float32),
               "label": rng.integers(0, 3, 96).astype(np.int32)}
    model = models.MLPClassifier(num_classes=3, hidden=(16,), dropout_rate=0.2)
    tx = optax.adam(1e-2)
    state = train.create_train_state(model, tx, dataset["image"][:1], seed=0)
    step_fn = train.make_train_step(model, tx, train.classification_loss(), input_key="image")

    def slow_step(state, batch):
        state, metrics = step_fn(state, batch)
        metrics["loss"].block_until_ready()
        print(f"STEP {int(state.step)}", flush=True)
        if paced:
            time.sleep(0.05)
        return state, metrics

    batches = data.BatchIterator(dataset, 16, seed=1)
    hooks = train.default_hooks(out, log_every=1, resume=resume, checkpoint_every=1000, progress=False,
                                tensorboard=False, plot=False)
    result = train.fit(state, slow_step, batches, num_steps=steps, hooks=hooks)
    print(f"PREEMPTED {int(result.state.step)}" if result.preempted else "DONE", flush=True)


def run_save(directory: str) -> None:
    with checkpoint.CheckpointManager(directory, max_to_keep=2) as manager:
        for step in range(1, 10_000):
            state = {"a": jnp.full((4096, 2048), float(step)), "b": jnp.full((2048, 2048), step, jnp.int32)}
            manager.save(step, state)
            manager.wait()
            print(f"SAVED {step}", flush=True)


def run_exit(directory: str) -> None:
    manager = checkpoint.CheckpointManager(directory)
    manager.save(5, {"a": jnp.full((4096, 4096), 5.0)})
    print("RETURNED", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "exit":
        run_exit(sys.argv[2])
    elif sys.argv[1] == "train":
        run_train(sys.argv[2], int(sys.argv[3]), "--resume" in sys.argv, "--paced" in sys.argv)
    else:
        run_save(sys.argv[2])
