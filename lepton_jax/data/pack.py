"""Packing a text corpus into fixed-length rows of token ids, as ArrayRecord shards.

Each file is a document. Documents are tokenized in worker processes, each
followed by the tokenizer's end-of-document id, and laid end to end into
rows of ``seq_len`` ids; ``segment_ids`` number the documents within each
row (1, 2, ...; 0 marks the padding of the last row), so attention can stay
inside a document and the loss can skip the padding. A hash of each file's
name puts it in the validation split (at least one document when there are
two or more). The same corpus gives the same files.

The packed rows are built in memory (4 bytes a token), then written.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from typing import Any, Sequence

import numpy as np

from lepton_jax.data.records import write_array_records
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


def pack_rows(documents: Sequence[np.ndarray], eod_id: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents (id arrays) end to end, each followed by ``eod_id``, cut into
    rows: ``inputs [R, seq_len]`` and ``segment_ids [R, seq_len]`` (documents
    numbered from 1 in each row; 0 pads the last row, whose ids are ``eod_id``)."""
    if not documents:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    stream = np.concatenate([np.append(np.asarray(d, np.int32), np.int32(eod_id)) for d in documents])
    owner = np.concatenate([np.full(len(d) + 1, k + 1, np.int64) for k, d in enumerate(documents)])
    rows = -(-len(stream) // seq_len)
    padding = rows * seq_len - len(stream)
    inputs = np.concatenate([stream, np.full(padding, eod_id, np.int32)]).reshape(rows, seq_len)
    owner = np.concatenate([owner, np.zeros(padding, np.int64)]).reshape(rows, seq_len)
    starts = np.concatenate([np.ones((rows, 1), bool), owner[:, 1:] != owner[:, :-1]], axis=1)
    segments = np.where(owner > 0, np.cumsum(starts, axis=1), 0).astype(np.int32)
    return inputs, segments


def _is_validation(path: str, root: str) -> float:
    name = os.path.relpath(path, root) if root else path
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2 ** 64


def pack_corpus(files: Sequence[str], tokenizer: str, seq_len: int, out_dir: str, *, shards: int = 1,
                val_fraction: float = 0.01, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Packs ``files`` (one document each) into ``out_dir/train`` and
    ``out_dir/val`` ArrayRecord folders (``inputs``, ``segment_ids``) and
    writes ``out_dir/metadata.json``; returns the metadata.

    Empty files and binary ones (a NUL byte, or not UTF-8) are skipped and
    counted in ``metadata["skipped"]``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"pack: --seq-len must be an int >= 2, got {seq_len!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"pack: --val-fraction must be in [0, 1), got {val_fraction}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"pack: --workers must be a positive int, got {workers!r}")
    tok = load_tokenizer(tokenizer)
    files = list(files)
    if workers > 1:
        context = multiprocessing.get_context("spawn")
        pool = context.Pool(workers, initializer=_init_worker, initargs=(os.fspath(tokenizer),))
        results = pool.imap(_tokenize, files, chunksize=max(1, len(files) // (workers * 8)))
    else:
        pool = None
        _init_worker(os.fspath(tokenizer))
        results = map(_tokenize, files)
    if progress:
        from tqdm.auto import tqdm

        results = tqdm(results, total=len(files), desc="tokenizing", unit="file")
    documents, skipped, text_bytes = [], {"empty": [], "binary": []}, 0
    try:
        for path, (kind, ids, size) in zip(files, results):
            if ids is None:
                skipped[kind].append(path)
            elif len(ids):
                documents.append((path, ids))
                text_bytes += size
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if not documents:
        raise ValueError(f"pack: no document to pack: {len(files)} files, {len(skipped['empty'])} empty, "
                         f"{len(skipped['binary'])} binary")
    root = os.path.commonpath([p for p, _ in documents]) if len(documents) > 1 else ""
    ranked = sorted(range(len(documents)), key=lambda i: _is_validation(documents[i][0], root))
    n_val = 0 if len(documents) < 2 or val_fraction == 0 else max(1, round(len(documents) * val_fraction))
    val_set = set(ranked[:n_val])
    splits = {"train": [d for i, (_, d) in enumerate(documents) if i not in val_set],
              "val": [d for i, (_, d) in enumerate(documents) if i in val_set]}
    if os.path.isdir(out_dir):
        for name in ("train", "val"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    os.makedirs(out_dir, exist_ok=True)
    split_meta, total_rows, padding = {}, 0, 0
    for name, docs in splits.items():
        inputs, segments = pack_rows(docs, tok.eod_id, seq_len)
        split_meta[name] = {"documents": len(docs), "rows": int(len(inputs)),
                            "tokens": int(sum(len(d) for d in docs))}
        if len(inputs):
            write_array_records({"inputs": inputs, "segment_ids": segments}, os.path.join(out_dir, name),
                                shards=min(shards, len(inputs)))
        total_rows += len(inputs)
        padding += int(np.sum(segments == 0))
    tokenizer_name = "bytes"
    if not isinstance(tokenizer, str) or tokenizer != "bytes":
        shutil.copyfile(os.fspath(tokenizer), os.path.join(out_dir, "tokenizer.json"))
        tokenizer_name = "tokenizer.json"
    metadata = {
        "format": PACK_FORMAT, "version": 1, "tokenizer": tokenizer_name, "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id, "seq_len": seq_len, "documents": len(documents),
        "tokens": int(sum(s["tokens"] for s in split_meta.values())), "rows": total_rows,
        "padding_fraction": padding / (total_rows * seq_len), "shards": shards, "text_bytes": text_bytes,
        "splits": split_meta,
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


__all__ = ["PACK_FORMAT", "is_pack", "lm_example", "pack_corpus", "pack_rows", "pack_tokenizer", "read_pack"]
