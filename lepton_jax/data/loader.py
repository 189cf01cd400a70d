"""Deterministic, resumable batching of in-memory arrays."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np

from lepton_jax.data.arrays import Dataset, num_examples


class BatchIterator:
    """An endless iterator over epochs of ``batch_size`` batches of ``data``.

    The order of epoch ``e`` is a pure function of ``(seed, e)``, so the
    stream is reproducible, and ``get_state``/``set_state`` (a small JSON-able
    dict) resume it exactly mid-epoch. Yields ``{name: array[batch_size, ...]}``.

    Args:
      data: mapping of arrays sharing the leading (example) dimension.
      batch_size: examples per batch.
      shuffle: reshuffle every epoch (otherwise the data's order).
      seed: seed of the shuffles.
      drop_remainder: drop the last incomplete batch of each epoch (keeps one
        shape under jit); otherwise it is yielded smaller.
      num_shards, shard_index: multi-host loading: ``batch_size`` is the
        global batch and this iterator yields only rows
        ``[shard_index * b, (shard_index + 1) * b)`` of each, ``b =
        batch_size / num_shards`` (every process draws the same permutation).
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        num_shards: int = 1,
        shard_index: int = 0,
    ) -> None:
        self.num_examples = num_examples(data, "BatchIterator")
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(
                f"BatchIterator: need num_shards >= 1 and 0 <= shard_index < num_shards, got {num_shards}, {shard_index}")
        if batch_size % num_shards:
            raise ValueError(f"BatchIterator: batch_size {batch_size} must divide into num_shards={num_shards} shards")
        if num_shards > 1 and not drop_remainder:
            raise ValueError("BatchIterator: sharded loading needs drop_remainder=True (equal rows per process)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"BatchIterator: batch_size must be a positive int, got {batch_size!r}")
        if drop_remainder and batch_size > self.num_examples:
            raise ValueError(
                f"BatchIterator: batch_size {batch_size} exceeds the {self.num_examples} examples "
                "with drop_remainder=True (no batch would ever be produced)"
            )
        self.data = {name: np.asarray(array) for name, array in data.items()}
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_remainder = drop_remainder
        self.num_shards, self.shard_index = num_shards, shard_index
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full if self.drop_remainder or rest == 0 else full + 1

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.steps_per_epoch:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        start = self.position * self.batch_size
        index = self._order[start:start + self.batch_size]
        if self.num_shards > 1:
            rows = self.batch_size // self.num_shards
            index = index[self.shard_index * rows:(self.shard_index + 1) * rows]
        self.position += 1
        return {name: array[index] for name, array in self.data.items()}

    def get_state(self) -> dict[str, int]:
        """The position: ``{"epoch", "position" (batches taken this epoch), "seed"}``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves to a position from ``get_state``; the next batch is the one an
        uninterrupted iterator would have produced there."""
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"BatchIterator.set_state: state lacks {sorted(missing)}; got {dict(state)}")
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"BatchIterator.set_state: state was saved with seed {state['seed']}, this iterator has {self.seed}"
            )
        position = int(state["position"])
        if not 0 <= position <= self.steps_per_epoch:
            raise ValueError(
                f"BatchIterator.set_state: position must be in [0, {self.steps_per_epoch}], got {position}"
            )
        self.epoch, self.position = int(state["epoch"]), position
        self._order = self._epoch_order(self.epoch)


def iterate_once(data: Dataset, batch_size: int, *, pad: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over ``data`` (for evaluation).

    With ``pad`` every batch has exactly ``batch_size`` examples: the last one
    is padded with copies of its first example, and each batch carries
    ``"mask"`` ``[batch_size]`` bool marking the real ones (one shape, one
    compilation). Without ``pad`` the last batch is smaller and also masked.
    """
    n = num_examples(data, "iterate_once")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"iterate_once: batch_size must be a positive int, got {batch_size!r}")
    if "mask" in data:
        raise ValueError("iterate_once: data already has a 'mask' entry; it is reserved for padding")
    arrays = {name: np.asarray(array) for name, array in data.items()}
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = {name: array[start:stop] for name, array in arrays.items()}
        mask = np.ones(stop - start, bool)
        if pad and stop - start < batch_size:
            fill = batch_size - (stop - start)
            batch = {name: np.concatenate([a, np.repeat(a[:1], fill, axis=0)]) for name, a in batch.items()}
            mask = np.concatenate([mask, np.zeros(fill, bool)])
        batch["mask"] = mask
        yield batch
