"""In-memory array datasets: validation, splits and a normalizer fitted on train."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

Dataset = Mapping[str, np.ndarray]


def num_examples(data: Dataset, where: str = "data") -> int:
    """The shared leading dimension of every array in ``data``."""
    if not isinstance(data, Mapping) or not data:
        raise TypeError(f"{where}: data must be a non-empty mapping of name -> array, got {type(data).__name__}")
    lengths = {name: len(np.asarray(array)) if np.ndim(array) else -1 for name, array in data.items()}
    first_name, first = next(iter(lengths.items()))
    for name, length in lengths.items():
        if length < 0:
            raise ValueError(f"{where}: data[{name!r}] must have a leading example axis, got a scalar")
        if length != first:
            raise ValueError(
                f"{where}: all arrays must share the leading dimension; data[{first_name!r}] has {first} "
                f"examples but data[{name!r}] has {length}"
            )
    return first


def split(
    data: Dataset,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    *,
    seed: int = 0,
    stratify_key: str | None = None,
) -> tuple[dict[str, np.ndarray], ...]:
    """Splits ``data`` into ``len(fractions)`` disjoint parts, deterministically per ``seed``.

    With ``stratify_key`` (e.g. ``"label"``) every class is split in the same
    proportions. Fractions must be positive and sum to 1; rounding leftovers
    go to the first part.
    """
    n = num_examples(data, "split")
    fractions = [float(f) for f in fractions]
    if len(fractions) < 2 or any(f <= 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split: fractions must be >= 2 positive numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    if stratify_key is None:
        groups = [rng.permutation(n)]
    else:
        if stratify_key not in data:
            raise ValueError(f"split: stratify_key {stratify_key!r} is not in data; it has {sorted(data)}")
        labels = np.asarray(data[stratify_key])
        groups = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for group in groups:
        sizes = [int(np.floor(f * len(group))) for f in fractions]
        sizes[0] += len(group) - sum(sizes)
        for i, chunk in enumerate(np.split(group, np.cumsum(sizes)[:-1])):
            parts[i].append(chunk)
    out = []
    for chunks in parts:
        index = np.sort(np.concatenate(chunks))
        out.append({name: np.asarray(array)[index] for name, array in data.items()})
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """``(x - mean) / std``, with statistics fitted on the training split only.

    ``mean`` and ``std`` broadcast against one example; ``std`` is floored at
    ``eps`` so constant features do not divide by zero.
    """

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, *, per_feature: bool = False, eps: float = 1e-6) -> "Normalizer":
        """Fits on ``x`` ``[N, ...]``: one scalar mean/std (default) or one per feature."""
        x = np.asarray(x, np.float64)
        if x.ndim < 1 or len(x) == 0:
            raise ValueError(f"Normalizer.fit: x must be a non-empty batch [N, ...], got shape {x.shape}")
        axis = 0 if per_feature else None
        mean = np.mean(x, axis=axis)
        std = np.maximum(np.std(x, axis=axis), eps)
        return cls(mean=np.asarray(mean, np.float32), std=np.asarray(std, np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self.mean.ndim and x.shape[-self.mean.ndim:] != self.mean.shape:
            raise ValueError(
                f"Normalizer: x must end with the fitted feature shape {self.mean.shape}, got {x.shape}"
            )
        return ((x - self.mean) / self.std).astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        """Undoes the normalization: ``x * std + mean`` (e.g. to show images).

        >>> n = Normalizer.fit(np.array([[0.0, 2.0], [4.0, 6.0]]))
        >>> n(np.array([3.0, 3.0])).tolist()
        [0.0, 0.0]
        >>> n.inverse(n(np.array([1.0, 5.0]))).tolist()
        [1.0, 5.0]
        """
        return (np.asarray(x) * self.std + self.mean).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, e.g. to store beside a checkpoint or an export."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Normalizer":
        return cls(mean=np.asarray(d["mean"], np.float32), std=np.asarray(d["std"], np.float32))
