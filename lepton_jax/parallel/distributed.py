"""Multi-host start-up and per-process data.

``initialize()`` wraps ``jax.distributed.initialize``: automatic on TPU pods
and under SLURM (JAX's cluster detection), or from arguments / the
environment (``LEPTON_COORDINATOR``, ``LEPTON_NUM_PROCESSES``,
``LEPTON_PROCESS_ID``) on other GPU clusters and for local CPU runs (gloo
collectives). A start-up that does not complete in ``timeout_s`` raises an
error naming the coordinator and the processes expected, instead of hanging.

Each process loads only its rows of every global batch
(``BatchIterator(..., num_shards=jax.process_count(), shard_index=jax.process_index())``)
and ``global_batch`` assembles the global arrays.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from lepton_jax.parallel.rules import Rules, batch_sharding, get_rules


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"initialize: environment variable {name} must be an integer, got {value!r}") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Any = None,
    timeout_s: int = 300,
) -> tuple[int, int]:
    """Joins this process to the job; returns ``(process_index, process_count)``.

    With no arguments and no ``LEPTON_*`` variables, JAX detects the cluster
    (TPU pod, SLURM, ...); a single process needs no call at all. On CPU the
    gloo collectives are enabled so cross-process all-reduces work.
    """
    coordinator_address = coordinator_address or os.environ.get("LEPTON_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int("LEPTON_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("LEPTON_PROCESS_ID")
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError(
            "initialize: give coordinator_address, num_processes and process_id together (arguments or "
            f"LEPTON_COORDINATOR/LEPTON_NUM_PROCESSES/LEPTON_PROCESS_ID), got {explicit}")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"initialize: process_id must be in [0, {num_processes}), got {process_id}")
    # Only the CPU client reads this; set before any backend starts (asking for
    # devices here would start them too early for jax.distributed).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # jax raises several types; add who was waiting for whom
        raise RuntimeError(
            f"initialize: process {process_id} of {num_processes} could not join the coordinator at "
            f"{coordinator_address or '(auto-detected)'} within {timeout_s}s: not all processes arrived, "
            f"or the address is unreachable. Cause: {e}") from e
    return jax.process_index(), jax.process_count()


def is_main_process() -> bool:
    """True on the process that writes logs, plots and progress bars."""
    return jax.process_index() == 0


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh, rules: str | Rules) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays split along the batch
    axis (``jax.make_array_from_process_local_data``). With one process this
    is ``shard_batch``."""
    rules = get_rules(rules)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, rules, value.ndim), value,
                                                          global_shape)
    return out
