"""Metric logging: an in-memory history, JSONL, TensorBoard events and a plot."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of ``metrics`` as Python floats (arrays are dropped)."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0 and np.issubdtype(value.dtype, np.number):
            out[name] = float(value)
    return out


class MetricLogger:
    """Records ``(step, split, metrics)`` rows.

    Every row goes to ``history``; with an ``output_dir`` also to
    ``metrics.jsonl`` (one JSON object a line) and, with ``tensorboard``, to
    TensorBoard event files under ``output_dir/tensorboard`` as
    ``"{split}/{name}"`` scalars.
    """

    def __init__(self, output_dir: str | None = None, *, tensorboard: bool = True) -> None:
        self.history: list[dict[str, Any]] = []
        self._jsonl = None
        self._writer = None
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
            self._jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a", encoding="utf-8")
            if tensorboard:
                self._writer = _summary_writer()(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Records the scalar metrics of one step and returns the row."""
        row = {"step": int(step), "split": split, **scalar_metrics(metrics)}
        self.history.append(row)
        self.write(row)
        return row

    def write(self, row: Mapping[str, Any]) -> None:
        """Writes a ``{"step", "split", **scalars}`` row to the files (not to ``history``)."""
        split, step = row["split"], row["step"]
        if self._jsonl is not None:
            # JSON has no NaN/inf: write them as strings so the file stays valid.
            safe = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
            self._jsonl.write(json.dumps(safe) + "\n")
            self._jsonl.flush()
        if self._writer is not None:
            for name, value in row.items():
                if name not in ("step", "split"):
                    self._writer.add_scalar(f"{split}/{name}", value, int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer() -> type:
    """tensorboardX's ``SummaryWriter``, imported without PyTorch.

    tensorboardX imports torch at import time when it is installed, only to
    accept torch tensors as values (it falls back to numpy without it); we log
    Python floats, and the import cost every training run that starts with
    TensorBoard about a second (0.8-1.4 CPU-s against 0.06 s without). The
    ``sys.modules`` entry of None makes that one ``import torch`` fail as if
    torch were absent; it is removed at once, so torch imports normally later.
    """
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            import tensorboardX
        finally:
            if sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
    import tensorboardX

    return tensorboardX.SummaryWriter


class History(list):
    """The rows ``fit`` logged (``{"step", "split", **metrics}`` dicts), a
    list that also plots itself: ``result.history.plot()`` in a notebook."""

    def split(self, name: str) -> list[dict[str, Any]]:
        """The rows of one split (``"train"`` or ``"eval"``)."""
        return [row for row in self if row["split"] == name]

    def values(self, metric: str, split: str = "train") -> tuple[list[int], list[float]]:
        """``(steps, values)`` of one metric in one split."""
        rows = [row for row in self.split(split) if metric in row]
        return [row["step"] for row in rows], [row[metric] for row in rows]

    def plot(self, metrics: Sequence[str] = ("loss", "accuracy")):
        """A matplotlib ``Figure``, one panel a metric and a line a split
        (shown inline when it is a notebook cell's value)."""
        _display_figures_inline()
        return _figure(self, metrics)

    def __repr__(self) -> str:
        splits = {row["split"] for row in self}
        last = self[-1]["step"] if self else 0
        return f"History({len(self)} rows, splits {sorted(splits)}, last step {last})"


def _display_figures_inline() -> None:
    """In IPython/Jupyter, make a returned ``Figure`` render as a PNG (what
    the inline backend does once pyplot has drawn something)."""
    import sys

    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython

    shell = get_ipython()
    if shell is not None and hasattr(shell, "display_formatter"):
        from IPython.core.pylabtools import select_figure_formats

        select_figure_formats(shell, {"png"})


def _figure(history: Sequence[Mapping[str, Any]], metrics: Sequence[str]):
    from matplotlib.figure import Figure  # no pyplot: no global figure state, any backend

    present = [m for m in metrics if any(m in row for row in history)]
    if not present:
        raise ValueError(f"plot_history: none of the metrics {list(metrics)} is in the history")
    fig = Figure(figsize=(5 * len(present), 3.6))
    axes = fig.subplots(1, len(present), squeeze=False)
    for ax, name in zip(axes[0], present):
        for split in sorted({row["split"] for row in history}):
            rows = [r for r in history if r["split"] == split and name in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[name] for r in rows], marker="o" if len(rows) < 30 else None,
                        label=split)
        ax.set_xlabel("step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_history(
    history: Sequence[Mapping[str, Any]],
    path: str,
    *,
    metrics: Sequence[str] = ("loss", "accuracy"),
) -> str:
    """Plots each metric against step, one panel a metric, a line a split.

    Writes a PNG to ``path`` and returns it. Metrics absent from the history
    are skipped.
    """
    _figure(history, metrics).savefig(path, dpi=110)
    return path
