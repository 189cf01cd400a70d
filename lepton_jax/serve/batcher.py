"""Dynamic batching: concurrent requests to one model version are gathered
into one padded batch, run once, and the rows handed back to each request.

A batch closes when it holds ``max_batch`` rows or ``max_wait_ms`` after its
first request arrived, whichever comes first. Its rows are padded up to the
smallest bucket size that holds them (powers of two up to ``max_batch``), so
the model compiles once per bucket, at start-up (``warm_up``), never while
serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np


def bucket_sizes(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch``: ``16 -> [1, 2, 4, 8, 16]``."""
    if max_batch < 1:
        raise ValueError(f"bucket_sizes: max_batch must be >= 1, got {max_batch}")
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


@dataclasses.dataclass
class _Item:
    arrays: list[np.ndarray]
    rows: int
    future: asyncio.Future
    arrived: float


class DynamicBatcher:
    """Batches calls of ``run_fn(*arrays) -> outputs`` (a pytree of arrays whose
    leading axis is the batch) for one model version.

    Args:
      run_fn: the model on already validated, preprocessed inputs.
      example_rows: one row of each input (shapes ``[1, ...]``), used to warm up.
      max_batch: the most rows per model call (requests above it are refused).
      max_wait_ms: how long the first request of a batch waits for company.
      on_batch: called with the rows of each batch run (for metrics).
    """

    def __init__(self, run_fn: Callable[..., Any], example_rows: Sequence[np.ndarray], *, max_batch: int = 64,
                 max_wait_ms: float = 5.0, on_batch: Callable[[int], None] | None = None) -> None:
        if max_wait_ms < 0:
            raise ValueError(f"DynamicBatcher: max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_fn = run_fn
        self.example_rows = [np.asarray(x)[:1] for x in example_rows]
        self.max_batch = int(max_batch)
        self.buckets = bucket_sizes(self.max_batch)
        self.max_wait = max_wait_ms / 1e3
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._held: _Item | None = None  # a request that did not fit the previous batch

    def warm_up(self) -> None:
        """Compiles the model for every bucket size (blocking; call at start-up)."""
        for size in self.buckets:
            padded = [np.repeat(x, size, axis=0) for x in self.example_rows]
            jax.block_until_ready(self.run_fn(*padded))

    def start(self) -> None:
        """Starts the batching loop on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Runs what is queued, then stops the loop (graceful shutdown)."""
        if self._task is None:
            return
        while self._held is not None or (self._queue is not None and not self._queue.empty()):
            await asyncio.sleep(self.max_wait or 0.001)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    async def submit(self, arrays: Sequence[np.ndarray]) -> Any:
        """Queues one request's rows; returns the model's outputs for exactly those rows."""
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.submit: the batcher is not started")
        rows = int(arrays[0].shape[0])
        if rows > self.max_batch:
            raise ValueError(f"at most {self.max_batch} instances per request (--max-batch), got {rows}")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(list(arrays), rows, future, time.monotonic()))
        return await future

    async def _next_batch(self) -> list[_Item]:
        first = self._held or await self._queue.get()
        self._held = None
        batch, rows = [first], first.rows
        deadline = first.arrived + self.max_wait
        while rows < self.max_batch:
            timeout = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if rows + item.rows > self.max_batch:
                self._held = item
                break
            batch.append(item)
            rows += item.rows
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            rows = sum(item.rows for item in batch)
            try:
                outputs = await loop.run_in_executor(None, self._run, batch, rows)
            except Exception as error:  # noqa: BLE001 - the batch's requests get the error, the loop lives on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(jax.tree.map(lambda x, s=start, n=item.rows: x[s:s + n], outputs))
                start += item.rows

    def _run(self, batch: list[_Item], rows: int) -> Any:
        size = next(b for b in self.buckets if b >= rows)
        inputs = []
        for i in range(len(batch[0].arrays)):
            stacked = np.concatenate([item.arrays[i] for item in batch], axis=0)
            if size > rows:  # pad with copies of the last row: finite, and sliced away after
                stacked = np.concatenate([stacked, np.repeat(stacked[-1:], size - rows, axis=0)], axis=0)
            inputs.append(stacked)
        outputs = jax.tree.map(np.asarray, self.run_fn(*inputs))
        if self.on_batch is not None:
            self.on_batch(rows)
        return outputs
