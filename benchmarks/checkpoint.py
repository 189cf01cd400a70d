"""Checkpoint benchmark: save/restore throughput and the cost of an async save.

    python -m benchmarks.checkpoint                       # 1 GB state, JSON to benchmarks/results/
    python -m benchmarks.checkpoint --gb 0.05 --out /tmp/c.json   # a quick check

Measures, for a state of ``--gb`` GB of fp32 arrays (64 MB each) in one
process with ``lepton_jax.checkpoint.CheckpointManager``:

- synchronous save: wall time of ``save`` + ``wait`` (MB/s);
- asynchronous save: the blocking part (``save`` returning) and the total
  until ``wait`` returns;
- restore onto the default device (MB/s);
- the step time of a compute-bound jitted step (a matmul chain) alone and
  while an asynchronous save of the state is in flight (slowdown, %).

Each number is the median of ``--repeats`` runs; the directory is on the
local disk (``--dir``, default a temporary directory).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from benchmarks import write_result
from lepton_jax import checkpoint

_ARRAY_MB = 64


def make_state(gigabytes: float) -> dict[str, jax.Array]:
    count = max(1, round(gigabytes * 1024 / _ARRAY_MB))
    rows = _ARRAY_MB * 1024 * 1024 // 4 // 4096
    keys = jax.random.split(jax.random.PRNGKey(0), count)
    return {f"w{i:03d}": jax.random.normal(k, (rows, 4096), jnp.float32) for i, k in enumerate(keys)}


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _timed_saves(state, root: str, repeats: int, async_save: bool) -> tuple[list[float], list[float]]:
    blocking, total = [], []
    for r in range(repeats):
        directory = os.path.join(root, f"{'async' if async_save else 'sync'}_{r}")
        with checkpoint.CheckpointManager(directory, async_save=async_save) as manager:
            start = time.perf_counter()
            manager.save(1, state)
            blocking.append(time.perf_counter() - start)
            manager.wait()
            total.append(time.perf_counter() - start)
    return blocking, total


def _step_fn(size: int):
    @jax.jit
    def step(x):
        for _ in range(8):
            x = jnp.tanh(x @ x) * 0.5
        return x

    x = jax.random.normal(jax.random.PRNGKey(1), (size, size), jnp.float32)
    jax.block_until_ready(step(x))
    return step, x


def _median_step(step, x, count: int) -> float:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        jax.block_until_ready(step(x))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _steps_during_async_save(state, root: str, step, x) -> tuple[float, int]:
    samples = []
    with checkpoint.CheckpointManager(os.path.join(root, "overlap"), async_save=True) as manager:
        manager.save(1, state)
        # Orbax reports whether its background write is still running.
        while manager._manager.is_saving_in_progress():  # noqa: SLF001 - measurement only
            start = time.perf_counter()
            jax.block_until_ready(step(x))
            samples.append(time.perf_counter() - start)
        manager.wait()
    return (statistics.median(samples) if samples else float("nan")), len(samples)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="state size in GB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-size", type=int, default=512, help="matmul size of the timed step")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/checkpoint_<date>.json)")
    args = parser.parse_args(argv)

    root = tempfile.mkdtemp(prefix="lepton_ckpt_bench_", dir=args.dir)
    try:
        state = make_state(args.gb)
        jax.block_until_ready(state)
        megabytes = _bytes(state) / 1e6
        _, sync_total = _timed_saves(state, root, args.repeats, async_save=False)
        async_blocking, async_total = _timed_saves(state, root, args.repeats, async_save=True)
        restore_times = []
        for r in range(args.repeats):
            start = time.perf_counter()
            restored = checkpoint.restore(os.path.join(root, f"sync_{r}"))
            jax.block_until_ready(restored)
            restore_times.append(time.perf_counter() - start)
            del restored
        step, x = _step_fn(args.step_size)
        alone = _median_step(step, x, 20)
        during, overlapped_steps = _steps_during_async_save(state, root, step, x)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    median = statistics.median
    result = {
        "bench": "checkpoint",
        "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "versions": {"jax": jax.__version__, "orbax_checkpoint": ocp.__version__},
        "state": {"megabytes": megabytes, "arrays": len(state), "dtype": "float32"},
        "repeats": args.repeats,
        "sync_save": {"seconds": median(sync_total), "mb_per_s": megabytes / median(sync_total)},
        "async_save": {"blocking_seconds": median(async_blocking), "total_seconds": median(async_total),
                       "blocking_mb_per_s": megabytes / median(async_blocking),
                       "mb_per_s": megabytes / median(async_total)},
        "restore": {"seconds": median(restore_times), "mb_per_s": megabytes / median(restore_times)},
        "step_during_async_save": {"step_ms_alone": alone * 1e3, "step_ms_during_save": during * 1e3,
                                   "slowdown_percent": (during / alone - 1) * 100, "steps_measured": overlapped_steps,
                                   "step": f"8 x ({args.step_size}^2 matmul + tanh), fp32"},
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"checkpoint_{result['date']}.json")
    print(json.dumps(result, indent=2))
    write_result(result, out)
    return result


if __name__ == "__main__":
    main()
