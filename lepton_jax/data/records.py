"""Datasets on disk as ArrayRecord shards, streamed by Grain.

``write_array_records({"image": x, "label": y}, out_dir, shards=4)`` writes
one record per example (its arrays, msgpack-encoded) into ``shards``
ArrayRecord files plus ``metadata.json``; ``ArrayRecords(out_dir)`` reads
them back by index. ``GrainLoader`` batches any indexable source (those, or
``InMemoryRecords`` over arrays) with a global shuffle per epoch, each
process reading its own part of every global batch, optional prefetch
worker processes, and a ``get_state``/``set_state`` position that ``fit``'s
``Checkpoint`` hook saves in every checkpoint, so a resumed run sees the
batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import serialization

FORMAT = "lepton_jax.array_records"
METADATA = "metadata.json"


def _shard_name(index: int, count: int) -> str:
    return f"records-{index:05d}-of-{count:05d}.array_record"


def write_array_records(arrays: Mapping[str, np.ndarray], out_dir: str | os.PathLike, *, shards: int = 1,
                        extra_metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes ``arrays`` (``{name: [N, ...]}``, one example per row) as
    ``shards`` ArrayRecord files under ``out_dir`` and returns the metadata
    also written to ``out_dir/metadata.json``. Example ``i`` is record ``i``
    (shard ``j`` holds a contiguous range); the same arrays give the same files."""
    if not arrays:
        raise ValueError("write_array_records: arrays is empty; expected {name: array}")
    arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    count = next(iter(lengths.values()))
    if any(n is None for n in lengths.values()) or len(set(lengths.values())) != 1 or not count:
        raise ValueError(f"write_array_records: every array needs the same number of rows (> 0), got {lengths}")
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= count:
        raise ValueError(f"write_array_records: shards must be an int in [1, {count}], got {shards!r}")
    with RecordWriter(out_dir, shards=shards, records=count) as writer:
        for i in range(count):
            writer.write({k: v[i] for k, v in arrays.items()})
        return writer.close(extra_metadata)


class RecordWriter:
    """Writes records (``{name: array}``) one at a time into ``shards``
    ArrayRecord files: record ``k`` to shard ``k % shards``, so a dataset
    larger than memory streams to disk, or, given the number of ``records``
    ahead, shard ``j`` a contiguous range. ``close()`` writes
    ``metadata.json``; ``ArrayRecords`` reads record ``k`` back as ``k``
    either way. Use as a context manager."""

    def __init__(self, out_dir: str | os.PathLike, *, shards: int = 1, records: int | None = None) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise ValueError(f"RecordWriter: shards must be a positive int, got {shards!r}")
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.names = [_shard_name(j, shards) for j in range(shards)]
        self._writers = [ArrayRecordWriter(os.path.join(self.out_dir, n), "group_size:1") for n in self.names]
        # Contiguous: shard j holds records [bounds[j], bounds[j + 1]).
        self._bounds = None if records is None else np.linspace(0, records, shards + 1).astype(int)
        self.counts = [0] * shards
        self.records = 0
        self.features: dict[str, dict[str, Any]] | None = None

    def write(self, record: Mapping[str, np.ndarray]) -> None:
        # numpy scalars stay scalars (msgpack stores them as such); anything else becomes an array
        record = {str(k): v if isinstance(v, (np.ndarray, np.generic)) else np.asarray(v) for k, v in record.items()}
        signature = tuple((k, v.dtype, v.shape) for k, v in record.items())
        if self.features is None:
            self._signature = signature
            self.features = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in record.items()}
        elif signature != self._signature:
            features = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in record.items()}
            raise ValueError(f"RecordWriter: record {self.records} has features {features}, the first had "
                             f"{self.features}")
        if self._bounds is None:
            shard = self.records % len(self._writers)
        else:
            shard = int(np.searchsorted(self._bounds, self.records, side="right")) - 1
        self._writers[shard].write(serialization.msgpack_serialize(record))
        self.counts[shard] += 1
        self.records += 1

    def close(self, extra_metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        for writer in self._writers:
            writer.close()
        metadata = {"format": FORMAT, "version": 1, "records": self.records, "shards": self.names,
                    "shard_records": self.counts, "order": "round_robin" if self._bounds is None else "contiguous",
                    "features": self.features or {}, **dict(extra_metadata or {})}
        with open(os.path.join(self.out_dir, METADATA), "w", encoding="utf-8") as f:
            json.dump(metadata, f, indent=2, sort_keys=True)
        return metadata

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:
            for writer in self._writers:
                writer.close()


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json`` of a records folder, checked."""
    path = os.path.join(os.fspath(directory), METADATA)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ArrayRecords: {os.fspath(directory)!r} has no {METADATA} "
                                "(write it with write_array_records or lepton-jax data pack)")
    with open(path, encoding="utf-8") as f:
        metadata = json.load(f)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"ArrayRecords: {path} is not a {FORMAT} file, its format is {metadata.get('format')!r}")
    return metadata


class ArrayRecords:
    """The records of a ``write_array_records`` folder by index: record ``i``
    is ``{name: array}``. A shard that cannot be read is named in the error."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = os.fspath(directory)
        self.metadata = read_metadata(directory)
        self.paths = [os.path.join(self.directory, name) for name in self.metadata["shards"]]
        for index, path in enumerate(self.paths):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ArrayRecords: shard {index} ({path}) is missing")
        self._starts = np.cumsum([0, *self.metadata["shard_records"]])
        self._source = None

    def _open(self):
        if self._source is None:
            import grain

            try:
                self._source = grain.sources.ArrayRecordDataSource(self.paths)
            except Exception as error:  # noqa: BLE001 (the reader's own error types vary)
                raise ValueError(f"ArrayRecords: cannot open the shards of {self.directory}: {error}") from error
            if len(self._source) != self.metadata["records"]:
                raise ValueError(f"ArrayRecords: {self.directory} holds {len(self._source)} records, its metadata "
                                 f"says {self.metadata['records']}")
        return self._source

    def __len__(self) -> int:
        return int(self.metadata["records"])

    def _position(self, index: int) -> tuple[int, int]:
        """(shard, the record's index in the shards' concatenation)."""
        if self.metadata.get("order") == "round_robin":  # RecordWriter: record k in shard k % S
            shard = index % len(self.paths)
            return shard, int(self._starts[shard]) + index // len(self.paths)
        return int(np.searchsorted(self._starts, index, side="right") - 1), index

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"ArrayRecords: index {index} is outside [0, {len(self)})")
        shard, position = self._position(index)
        try:
            return serialization.msgpack_restore(self._open()[position])
        except (ValueError, RuntimeError, OSError) as error:
            raise ValueError(f"ArrayRecords: record {index} in shard {shard} ({self.paths[shard]}) cannot be "
                             f"read: {error}") from error

    def __getstate__(self) -> dict[str, Any]:  # worker processes reopen the files
        return {**self.__dict__, "_source": None}


class InMemoryRecords:
    """Arrays ``{name: [N, ...]}`` as records by index (the in-memory twin of ``ArrayRecords``)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: len(v) for k, v in self.arrays.items()}
        if not lengths or len(set(lengths.values())) != 1:
            raise ValueError(f"InMemoryRecords: every array needs the same number of rows, got {lengths}")
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}


def _absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; a program that never parsed them (no absl.app) would fail.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class GrainLoader:
    """Batches of a record source, through Grain.

    Args:
      source: ``ArrayRecords``, ``InMemoryRecords`` or any ``len``/``[i]`` source of dict records.
      batch_size: the global batch; each of the ``jax.process_count()``
        processes yields its ``batch_size / process_count`` rows of it.
      seed: the shuffle seed (a new order every epoch); ``shuffle=False`` keeps the source's order.
      num_epochs: how many passes (``None``: forever).
      worker_count: prefetch worker processes (0: in this process); the
        batches are the same for any count.
      worker_buffer_size: batches each worker prepares ahead.
      transforms: functions ``record -> record`` applied before batching (in the workers).

    Batches are dicts of numpy arrays. ``steps_per_epoch`` counts this
    process's full batches per pass; ``get_state``/``set_state`` save and
    restore the position (JSON-able).
    """

    def __init__(self, source: Any, *, batch_size: int, seed: int = 0, num_epochs: int | None = None,
                 shuffle: bool = True, worker_count: int = 0, worker_buffer_size: int = 2,
                 transforms: Sequence[Callable[[dict], dict]] = ()) -> None:
        import grain

        processes, index = jax.process_count(), jax.process_index()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"GrainLoader: batch_size must be a positive int, got {batch_size!r}")
        if batch_size % processes:
            raise ValueError(f"GrainLoader: batch_size {batch_size} must be divisible by the number of processes "
                             f"({processes}), each of which yields its part of every global batch")
        if num_epochs is not None and (isinstance(num_epochs, bool) or not isinstance(num_epochs, int)
                                       or num_epochs < 1):
            raise ValueError(f"GrainLoader: num_epochs must be a positive int or None, got {num_epochs!r}")
        if isinstance(worker_count, bool) or not isinstance(worker_count, int) or worker_count < 0:
            raise ValueError(f"GrainLoader: worker_count must be an int >= 0, got {worker_count!r}")
        if len(source) < batch_size:
            raise ValueError(f"GrainLoader: the source has {len(source)} records, fewer than one batch of {batch_size}")
        self.batch_size, self.seed, self.num_epochs = batch_size, seed, num_epochs
        self.local_batch_size = batch_size // processes
        self.steps_per_epoch = len(source) // batch_size
        dataset = grain.MapDataset.source(source)
        if shuffle:
            dataset = dataset.shuffle(seed=seed)  # a fresh permutation every epoch
        dataset = dataset.repeat(num_epochs)
        # Global batch s is positions [s*B, (s+1)*B) of the stream; process p reads every P-th of them.
        dataset = dataset[index::processes] if processes > 1 else dataset
        for transform in transforms:
            dataset = dataset.map(transform)
        dataset = dataset.batch(self.local_batch_size, drop_remainder=True)
        stream = dataset.to_iter_dataset()
        if worker_count:
            _absl_flags_parsed()
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
        self._stream = stream
        self._iterator = iter(stream)
        self._config = {"seed": seed, "batch_size": batch_size, "processes": processes, "records": len(source)}

    def __iter__(self) -> "GrainLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position: the next batch is the one after the last one returned."""
        return {**self._config, "grain": self._iterator.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Moves to a position from ``get_state`` (of a loader with the same seed, batch and source size)."""
        for key, value in self._config.items():
            if key not in state:
                raise ValueError(f"GrainLoader.set_state: state lacks {key!r}; got keys {sorted(state)}")
            if state[key] != value:
                raise ValueError(f"GrainLoader.set_state: the state was saved with {key}={state[key]!r}, "
                                 f"this loader has {key}={value!r}")
        self._iterator.set_state(state["grain"])


__all__ = ["ArrayRecords", "GrainLoader", "InMemoryRecords", "RecordWriter", "read_metadata", "write_array_records"]
