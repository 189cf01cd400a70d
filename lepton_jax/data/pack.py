"""Packing a text corpus into fixed-length rows of token ids, as ArrayRecord shards.

Each file is a document. Documents are tokenized in worker processes, each
followed by the tokenizer's end-of-document id, and laid end to end into
rows of ``seq_len`` ids; ``segment_ids`` number the documents within each
row (1, 2, ...; 0 marks the padding of the last row), so attention can stay
inside a document and the loss can skip the padding. A hash of each file's
name puts it in the validation split (at least one document when there are
two or more). The same corpus gives the same files.

Rows stream to the shards as they fill (row ``k`` to shard ``k % shards``):
memory holds one document and less than a row, whatever the corpus's size.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from typing import Any, Sequence

import numpy as np

from lepton_jax.data.records import RecordWriter
from lepton_jax.data.tokenizers import load_tokenizer

PACK_FORMAT = "lepton_jax.packed_text"

_worker_tokenizer = None


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _read(path: str) -> tuple[str, str | None]:
    """``(kind, text)``: kind is "ok", "empty" or "binary"."""
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.strip():
        return "empty", None
    if b"\x00" in raw:
        return "binary", None
    try:
        return "ok", raw.decode("utf-8")
    except UnicodeDecodeError:
        return "binary", None


def _tokenize(path: str) -> tuple[str, np.ndarray | None, int]:
    kind, text = _read(path)
    if text is None:
        return kind, None, 0
    return kind, _worker_tokenizer.encode(text), len(text.encode("utf-8"))


class RowPacker:
    """Documents in, rows out: ``add(ids)`` appends a document and its
    end-of-document id and returns the rows it completed, ``finish()`` the
    last one padded; each row is ``(inputs [seq_len], segment_ids [seq_len])``.
    Holds less than one row between documents, so a corpus streams through it."""

    def __init__(self, eod_id: int, seq_len: int) -> None:
        if eod_id is None:
            raise ValueError("pack: the tokenizer has no end-of-document token, which packing puts between documents")
        self.eod_id, self.seq_len = int(eod_id), int(seq_len)
        self._ids, self._owner = np.zeros(0, np.int32), np.zeros(0, np.int64)
        self.documents = 0
        self.padding = 0

    def _rows(self, ids: np.ndarray, owner: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        ids, owner = ids.reshape(-1, self.seq_len), owner.reshape(-1, self.seq_len)
        starts = np.concatenate([np.ones((len(owner), 1), bool), owner[:, 1:] != owner[:, :-1]], axis=1)
        segments = np.where(owner > 0, np.cumsum(starts, axis=1), 0).astype(np.int32)
        return list(zip(ids, segments))

    def add(self, document: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        self.documents += 1
        document = np.asarray(document, np.int32)
        ids = np.concatenate([self._ids, document, np.array([self.eod_id], np.int32)])
        owner = np.concatenate([self._owner, np.full(len(document) + 1, self.documents, np.int64)])
        full = len(ids) // self.seq_len * self.seq_len
        self._ids, self._owner = ids[full:], owner[full:]
        return self._rows(ids[:full], owner[:full])

    def finish(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if not len(self._ids):
            return []
        pad = self.seq_len - len(self._ids)
        self.padding += pad
        ids = np.concatenate([self._ids, np.full(pad, self.eod_id, np.int32)])
        owner = np.concatenate([self._owner, np.zeros(pad, np.int64)])
        self._ids, self._owner = np.zeros(0, np.int32), np.zeros(0, np.int64)
        return self._rows(ids, owner)


def pack_rows(documents: Sequence[np.ndarray], eod_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents (id arrays) end to end, each followed by ``eod_id``, cut into
    rows: ``inputs [R, seq_len]`` and ``segment_ids [R, seq_len]`` (documents
    numbered from 1 in each row; 0 pads the last row, whose ids are ``eod_id``)."""
    packer = RowPacker(eod_id, seq_len)
    rows = [row for document in documents for row in packer.add(document)] + packer.finish()
    if not rows:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    return np.stack([r for r, _ in rows]), np.stack([s for _, s in rows])


def _hash(path: str, root: str) -> bytes:
    name = os.path.relpath(path, root) if root else os.path.basename(path)
    return hashlib.sha256(name.encode("utf-8")).digest()


def pack_corpus(files: Sequence[str], tokenizer: str, seq_len: int, out_dir: str, *, shards: int = 1,
                val_fraction: float = 0.01, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Packs ``files`` (one document each) into ``out_dir/train`` and
    ``out_dir/val`` ArrayRecord folders (``inputs``, ``segment_ids``) and
    writes ``out_dir/metadata.json``; returns the metadata.

    Files are read in the order of a hash of their names (relative to the
    corpus's common folder); the first ``round(len(files) * val_fraction)``
    documents (at least one when there are two or more) go to the validation
    split. Rows stream to the shards as they fill, so memory holds one
    document and less than a row. Empty files and binary ones (a NUL byte,
    or not UTF-8) are skipped and counted in ``metadata["skipped"]``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"pack: --seq-len must be an int >= 2, got {seq_len!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"pack: --val-fraction must be in [0, 1), got {val_fraction}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"pack: --workers must be a positive int, got {workers!r}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"pack: --shards must be a positive int, got {shards!r}")
    tok = load_tokenizer(tokenizer)
    root = os.path.commonpath([os.path.abspath(f) for f in files]) if len(files) > 1 else ""
    files = sorted(files, key=lambda f: _hash(os.path.abspath(f), root))
    quota = 0 if val_fraction == 0 else max(1, round(len(files) * val_fraction))
    for name in ("train", "val"):
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    packers = {name: RowPacker(tok.eod_id, seq_len) for name in ("train", "val")}
    writers = {name: RecordWriter(os.path.join(out_dir, name), shards=shards) for name in ("train", "val")}
    tokens = {"train": 0, "val": 0}

    def route(split: str, ids: np.ndarray) -> None:
        tokens[split] += len(ids)
        for row, segments in packers[split].add(ids):
            writers[split].write({"inputs": row, "segment_ids": segments})

    if workers > 1:
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(workers, initializer=_init_worker, initargs=(os.fspath(tokenizer),))
        results = pool.imap(_tokenize, files, chunksize=max(1, min(64, len(files) // (workers * 8))))
    else:
        pool = None
        _init_worker(os.fspath(tokenizer))
        results = map(_tokenize, files)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(files), desc="tokenizing", unit="file")
    skipped, text_bytes, pending = {"empty": [], "binary": []}, 0, None
    try:
        for path, (kind, ids, size) in zip(files, results):
            if ids is None or not len(ids):
                skipped[kind if ids is None else "empty"].append(path)
                continue
            text_bytes += size
            # One document waits, so the last can go to training when nothing else would.
            if pending is not None:
                route("val" if packers["val"].documents < quota else "train", pending)
            pending = ids
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if pending is None:
        for writer in writers.values():
            writer.close()
        raise ValueError(f"pack: no document to pack: {len(files)} files, {len(skipped['empty'])} empty, "
                         f"{len(skipped['binary'])} binary")
    route("train" if packers["train"].documents == 0 or packers["val"].documents >= quota else "val", pending)
    split_meta, padding = {}, 0
    for name in ("train", "val"):
        for row, segments in packers[name].finish():
            writers[name].write({"inputs": row, "segment_ids": segments})
        writers[name].close()
        padding += packers[name].padding
        split_meta[name] = {"documents": packers[name].documents, "rows": writers[name].records,
                            "tokens": tokens[name]}
    total_rows = sum(s["rows"] for s in split_meta.values())
    tokenizer_name = "bytes"
    if os.fspath(tokenizer) != "bytes":
        shutil.copyfile(os.fspath(tokenizer), os.path.join(out_dir, "tokenizer.json"))
        tokenizer_name = "tokenizer.json"
    metadata = {
        "format": PACK_FORMAT, "version": 2, "tokenizer": tokenizer_name, "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id, "seq_len": seq_len, "documents": sum(s["documents"] for s in split_meta.values()),
        "tokens": tokens["train"] + tokens["val"], "rows": total_rows, "padding_fraction": padding / (total_rows * seq_len),
        "shards": shards, "text_bytes": text_bytes, "splits": split_meta,
        "skipped": {k: {"count": len(v), "files": [os.path.basename(p) for p in v[:20]]} for k, v in skipped.items()},
    }
    with open(os.path.join(out_dir, "metadata.json"), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    return metadata


def lm_example(record: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row as a next-token example: ``inputs`` (all but the last id),
    ``targets`` (the next ids; -100 where the next id starts another document
    or is padding, so the loss skips it) and ``segment_ids`` of the inputs."""
    row, segments = np.asarray(record["inputs"]), np.asarray(record["segment_ids"])
    same = (segments[1:] == segments[:-1]) & (segments[1:] > 0)
    return {"inputs": row[:-1], "targets": np.where(same, row[1:], -100).astype(np.int32),
            "segment_ids": segments[:-1]}


def is_pack(directory: str) -> bool:
    """Whether ``directory`` holds a packed corpus."""
    return bool(directory) and os.path.isfile(os.path.join(directory, "metadata.json")) and \
        os.path.isdir(os.path.join(directory, "train"))


def read_pack(directory: str) -> dict[str, Any]:
    """A pack's ``metadata.json``, checked."""
    path = os.path.join(directory, "metadata.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pack: {directory!r} has no metadata.json (make it with lepton-jax data pack)")
    with open(path, encoding="utf-8") as f:
        metadata = json.load(f)
    if metadata.get("format") != PACK_FORMAT:
        raise ValueError(f"pack: {path} is not a packed corpus (format {metadata.get('format')!r})")
    return metadata


def pack_tokenizer(directory: str) -> Any:
    """The tokenizer a pack was made with."""
    name = read_pack(directory)["tokenizer"]
    return load_tokenizer("bytes" if name == "bytes" else os.path.join(directory, name))


__all__ = ["PACK_FORMAT", "RowPacker", "is_pack", "lm_example", "pack_corpus", "pack_rows", "pack_tokenizer", "read_pack"]
