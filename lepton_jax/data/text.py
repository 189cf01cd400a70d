"""Byte-level text: a corpus from files (by default the Python standard
library's own sources, present on every machine with Python), a held-out
split, and a resumable random-window sampler for language modelling."""

from __future__ import annotations

import glob
import os
import sysconfig
from typing import Any, Mapping, Sequence

import numpy as np


def default_corpus_files() -> list[str]:
    """The standard library's ``.py`` files (no site-packages), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = [p for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
             if "site-packages" not in p and "dist-packages" not in p]
    return sorted(files)


def load_bytes(paths: Sequence[str] | None = None, *, max_bytes: int = 8 << 20) -> np.ndarray:
    """Concatenates files (directories are searched for ``.py``, ``.txt``,
    ``.md`` and ``.rst``) into a ``uint8`` array of at most ``max_bytes``."""
    files: list[str] = []
    for path in (paths if paths else default_corpus_files()):
        if os.path.isdir(path):
            for pattern in ("*.py", "*.txt", "*.md", "*.rst"):
                files += glob.glob(os.path.join(path, "**", pattern), recursive=True)
        elif os.path.exists(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"load_bytes: no such file or directory {path!r}")
    chunks, total = [], 0
    for path in sorted(set(files)) if paths else files:
        with open(path, "rb") as f:
            chunk = f.read(max_bytes - total)
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    if total == 0:
        raise ValueError(f"load_bytes: the corpus is empty ({len(files)} files)")
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).copy()


def split_tokens(tokens: np.ndarray, validation_fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The last ``validation_fraction`` of the stream is held out (contiguous,
    so no window straddles the two).

    >>> train, held_out = split_tokens(np.arange(10), 0.2)
    >>> train.tolist(), held_out.tolist()
    ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"split_tokens: validation_fraction must be in (0, 1), got {validation_fraction}")
    cut = int(len(tokens) * (1.0 - validation_fraction))
    return tokens[:cut], tokens[cut:]


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> dict[str, np.ndarray]:
    """Non-overlapping ``{"inputs", "targets"}`` windows ``[N, seq_len]`` (targets shifted by one).

    >>> w = eval_windows(np.arange(9), 4, max_windows=10)
    >>> w["inputs"].tolist(), w["targets"].tolist()
    ([[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 8]])
    """
    count = min(max_windows, (len(tokens) - 1) // seq_len)
    if count < 1:
        raise ValueError(f"eval_windows: {len(tokens)} tokens hold no window of {seq_len + 1}")
    starts = np.arange(count) * seq_len
    index = starts[:, None] + np.arange(seq_len + 1)[None]
    windows = tokens[index].astype(np.int32)
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


class TokenWindows:
    """Endless batches of random windows ``{"inputs", "targets"}`` ``[B, S]``.

    Batch ``n`` is a pure function of ``(seed, n)``, so the stream is
    reproducible and resumes exactly from ``get_state``. An "epoch" is
    ``len(tokens) // (B * S)`` batches (about one pass over the data).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, *, seed: int = 0) -> None:
        if len(tokens) <= seq_len + 1:
            raise ValueError(f"TokenWindows: need more than seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"TokenWindows: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        self.tokens = np.asarray(tokens)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, int(seed)
        self.count = 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.tokens) // (self.batch_size * self.seq_len))

    @property
    def epoch(self) -> int:
        return self.count // self.steps_per_epoch

    def __iter__(self) -> "TokenWindows":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.count])
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, self.batch_size)
        windows = self.tokens[starts[:, None] + np.arange(self.seq_len + 1)[None]].astype(np.int32)
        self.count += 1
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}

    def get_state(self) -> dict[str, int]:
        return {"count": self.count, "seed": self.seed}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"TokenWindows.set_state: state has seed {state['seed']}, this sampler {self.seed}")
        self.count = int(state["count"])
