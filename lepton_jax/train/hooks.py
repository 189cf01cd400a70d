"""Hooks: what ``fit`` does besides stepping, one small object per job.

A hook is called after every step that is a multiple of its ``every`` and at
the last step (``loop.at_end``). It may also react to the other moments of a
run: ``on_start`` (before the first step; resume happens here), ``on_step``
(after every step, for cheap bookkeeping), ``on_row``/``on_log`` (each logged
row of metrics, before and after it is recorded) and ``on_end``. Hooks run in
the order given; any of them can end training with ``loop.request_stop``.

A hook of your own is a few lines::

    class PrintLoss(train.Hook):
        def __call__(self, loop):
            print(loop.step, float(loop.metrics["loss"]))

    train.fit(state, step, batches, num_steps=100, hooks=[PrintLoss(every=10)])

or a function: ``hooks=[train.every(10)(lambda loop: ...)]``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import jax
import numpy as np

from lepton_jax.train.logging import MetricLogger, plot_history
from lepton_jax.train.step import evaluate

if TYPE_CHECKING:
    from lepton_jax.train.loop import Loop


def check_positive(owner: str, name: str, value: int | None, *, allow_none: bool = False) -> int | None:
    """``value`` as a positive int (or ``None`` where allowed), else a ValueError
    naming ``owner``, the argument ``name`` and what was received."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return value


class Hook:
    """Base class of ``fit``'s hooks; every method is optional.

    Args:
      every: run ``__call__`` after every ``every``-th step (and at the end).
    """

    every: int = 1

    def __init__(self, every: int = 1) -> None:
        self.every = check_positive(type(self).__name__, "every", every)

    def on_start(self, loop: "Loop") -> None:
        """Before the first step (``loop.step`` is where training starts)."""

    def on_step(self, loop: "Loop") -> None:
        """After every step, before the due hooks are called."""

    def __call__(self, loop: "Loop") -> None:
        """After each step that is a multiple of ``every``, and at the end."""

    def on_row(self, loop: "Loop", row: dict[str, Any]) -> None:
        """A row of metrics is being logged: add entries to it here."""

    def on_log(self, loop: "Loop", row: Mapping[str, Any]) -> None:
        """A row of metrics was logged (``row["split"]`` says which)."""

    def on_end(self, loop: "Loop") -> None:
        """After the last step, also when a hook or a signal stopped training."""


class FunctionHook(Hook):
    """A plain ``fn(loop)`` run as a hook every ``every`` steps."""

    def __init__(self, fn: Callable[["Loop"], Any], every: int = 1) -> None:
        super().__init__(every)
        self.fn = fn

    def __call__(self, loop: "Loop") -> None:
        self.fn(loop)


def every(n: int) -> Callable[[Callable[["Loop"], Any]], FunctionHook]:
    """Decorator: ``@train.every(100)`` makes ``fn(loop)`` a hook run every 100 steps."""
    check_positive("every", "n", n)
    return lambda fn: FunctionHook(fn, n)


def as_hook(hook: Hook | Callable[["Loop"], Any]) -> Hook:
    """A ``Hook`` as it is; a callable as a hook run every step."""
    if isinstance(hook, Hook):
        return hook
    if callable(hook):
        return FunctionHook(hook)
    raise TypeError(f"fit: hooks must be train.Hook objects or callables fn(loop), got {type(hook).__name__}")


def _every_epoch(loop: "Loop", owner: str) -> int:
    if not hasattr(loop.data, "steps_per_epoch"):
        raise ValueError(f"{owner}: every=None means once an epoch, but the data has no steps_per_epoch")
    return loop.data.steps_per_epoch


class TrainMetrics(Hook):
    """Logs the means of the train step's metrics over the last ``every`` steps
    as a ``"train"`` row, with ``steps_per_second`` and ``epoch``."""

    def __init__(self, every: int = 50) -> None:
        super().__init__(every)
        self._window: list[Mapping[str, Any]] = []
        self._window_start = 0.0

    def on_start(self, loop: "Loop") -> None:
        self._window, self._window_start = [], time.perf_counter()

    def on_step(self, loop: "Loop") -> None:
        self._window.append(loop.metrics)

    def __call__(self, loop: "Loop") -> None:
        if not self._window:
            return
        window = jax.device_get(self._window)
        means = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
        means["steps_per_second"] = len(window) / max(time.perf_counter() - self._window_start, 1e-9)
        if hasattr(loop.data, "epoch"):
            means["epoch"] = loop.data.epoch
        loop.log("train", means)
        self._window, self._window_start = [], time.perf_counter()

    def on_end(self, loop: "Loop") -> None:
        # A hook that stopped training after this hook had run for the step.
        if not loop.preempted:
            self(loop)


class Throughput(Hook):
    """Adds ``tokens_per_second`` and ``mfu`` (model FLOPs over the devices'
    peak; ``peak_flops`` is for all devices together) to each train row."""

    def __init__(self, *, tokens_per_step: int | None = None, flops_per_step: float | None = None,
                 peak_flops: float | None = None) -> None:
        super().__init__()
        self.tokens_per_step, self.flops_per_step, self.peak_flops = tokens_per_step, flops_per_step, peak_flops

    def on_row(self, loop: "Loop", row: dict[str, Any]) -> None:
        if row["split"] != "train" or "steps_per_second" not in row:
            return
        if self.tokens_per_step:
            row["tokens_per_second"] = row["steps_per_second"] * self.tokens_per_step
        if self.flops_per_step and self.peak_flops:
            row["mfu"] = row["steps_per_second"] * self.flops_per_step / self.peak_flops


class Evaluate(Hook):
    """Evaluates ``eval_step`` on ``data`` (a dict of arrays, iterated once in
    padded batches of ``batch_size``), logs an ``"eval"`` row and keeps the
    result in ``loop.eval_metrics``.

    Args:
      every: steps between evaluations; ``None``: once an epoch.
      transform: adds derived entries to each result (e.g. bits per byte).
    """

    def __init__(self, eval_step: Callable, data: Mapping[str, np.ndarray], *, every: int | None = None,
                 batch_size: int = 256,
                 transform: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None) -> None:
        self.every = check_positive("Evaluate", "every", every, allow_none=True)
        check_positive("Evaluate", "batch_size", batch_size)
        self.eval_step, self.data, self.transform, self.batch_size = eval_step, data, transform, batch_size
        self._last = None

    def on_start(self, loop: "Loop") -> None:
        if self.every is None:
            self.every = _every_epoch(loop, "Evaluate")

    def __call__(self, loop: "Loop") -> None:
        from lepton_jax.data import iterate_once

        metrics = evaluate(loop.state, self.eval_step, iterate_once(self.data, self.batch_size, pad=True))
        if self.transform is not None:
            metrics = {**metrics, **self.transform(metrics)}
        loop.eval_metrics, self._last = metrics, loop.step
        loop.log("eval", metrics)

    def on_end(self, loop: "Loop") -> None:
        # A hook that stopped training after this hook had run for the step.
        if not loop.preempted and self._last != loop.step and loop.step > loop.start_step:
            self(loop)


class MetricFiles(Hook):
    """Writes every logged row to ``output_dir/metrics.jsonl`` and, with
    ``tensorboard``, to TensorBoard events under ``output_dir/tensorboard``
    (process 0 only)."""

    def __init__(self, output_dir: str, *, tensorboard: bool = True) -> None:
        super().__init__()
        self.output_dir, self.tensorboard = output_dir, tensorboard
        self._logger: MetricLogger | None = None

    def on_start(self, loop: "Loop") -> None:
        if loop.is_main:
            self._logger = MetricLogger(self.output_dir, tensorboard=self.tensorboard)
            loop.exit_stack.callback(self._logger.close)

    def on_log(self, loop: "Loop", row: Mapping[str, Any]) -> None:
        if self._logger is not None:
            self._logger.write(row)


class ProgressBar(Hook):
    """A ``tqdm.auto`` progress bar (a widget in notebooks) showing the loss,
    accuracy and tokens/s of the latest train row (process 0 only)."""

    def __init__(self) -> None:
        super().__init__()
        self._bar = None

    def on_start(self, loop: "Loop") -> None:
        if loop.is_main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=loop.total_steps, unit="step", dynamic_ncols=True)
            loop.exit_stack.callback(self._bar.close)

    def on_step(self, loop: "Loop") -> None:
        if self._bar is not None:
            if self._bar.n == 0 and loop.step > 1:  # resumed: start the count (and the rate) there
                self._bar.n = self._bar.initial = loop.step - 1
            self._bar.update(loop.step - self._bar.n)

    def on_log(self, loop: "Loop", row: Mapping[str, Any]) -> None:
        if self._bar is not None and row["split"] == "train":
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                                   if k in ("loss", "accuracy", "tokens_per_second")})


class Checkpoint(Hook):
    """Saves the state, the data position and the latest eval metrics every
    ``every`` steps and at the end, under ``output_dir/checkpoints``; with
    ``resume``, ``on_start`` continues from the latest readable checkpoint
    (state, step and data position, so the run goes on exactly as if it had
    not stopped).

    Args:
      every: steps between saves; ``None``: once an epoch.
      max_to_keep / options: ``CheckpointManager`` settings (e.g.
        ``{"keep_every_n_steps": 1000, "best_metric": "loss"}``).
      logical_axes: the params' logical axis names, saved so the checkpoint
        can be restored onto another mesh (``parallel.param_logical_axes``).
      extra: JSON saved with each checkpoint beside the data position.
    """

    def __init__(self, output_dir: str, *, every: int | None = None, max_to_keep: int = 3,
                 options: Mapping[str, Any] | None = None, logical_axes: Any = None,
                 extra: Mapping[str, Any] | None = None, resume: bool = False) -> None:
        self.every = check_positive("Checkpoint", "every", every, allow_none=True)
        self.output_dir, self.max_to_keep, self.options = output_dir, max_to_keep, dict(options or {})
        self.logical_axes, self.extra, self.resume = logical_axes, dict(extra or {}), resume
        self.manager = None
        self._last_saved: int | None = None

    def on_start(self, loop: "Loop") -> None:
        from lepton_jax.checkpoint import CheckpointManager

        if self.every is None:
            self.every = _every_epoch(loop, "Checkpoint")
        self.manager = CheckpointManager(os.path.join(self.output_dir, "checkpoints"), max_to_keep=self.max_to_keep,
                                         **self.options)
        loop.exit_stack.callback(self.manager.close)
        if self.resume and self.manager.latest_step() is not None:
            loop.state = self.manager.restore(target=loop.state)  # skips a damaged latest step with a warning
            loop.step = loop.resumed_from = int(loop.state.step)
            loop.data.set_state(self.manager.extra(loop.step)["data"])

    def __call__(self, loop: "Loop", force: bool = False) -> None:
        metrics = {k: v for k, v in (loop.eval_metrics or {}).items() if isinstance(v, (int, float, np.floating))}
        self.manager.save(loop.step, loop.state, metrics=metrics, force=force, logical_axes=self.logical_axes,
                          extra={**self.extra, "data": loop.data.get_state(), "step": loop.step})
        self._last_saved = loop.step

    def on_end(self, loop: "Loop") -> None:
        if self._last_saved != loop.step and loop.step > loop.start_step:
            self(loop, force=loop.preempted)
        if loop.preempted:
            self.manager.wait()
            if loop.is_main:
                print(f"fit: {loop.stop_reason}; saved step {loop.step} to {self.manager.directory}; "
                      "resume=True continues", flush=True)


class Preemption(Hook):
    """Turns SIGTERM/SIGINT during ``fit`` into a stop at the next step
    boundary (``loop.preempted``), so a ``Checkpoint`` hook saves and waits
    for the write; a second Ctrl-C stops at once. Only from the main thread,
    where Python delivers signals."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        super().__init__()
        self.signals = tuple(signals)
        self._catcher: _SignalCatcher | None = None

    def on_start(self, loop: "Loop") -> None:
        if threading.current_thread() is threading.main_thread():
            self._catcher = loop.exit_stack.enter_context(_SignalCatcher(self.signals))

    def on_step(self, loop: "Loop") -> None:
        received = self._catcher.received if self._catcher is not None else None
        if received is not None and loop.step < loop.total_steps:
            loop.request_stop(f"{signal.Signals(received).name} received", preempted=True)


class _SignalCatcher(contextlib.AbstractContextManager):
    """Records the first of ``signals`` received; restores the old handlers on exit."""

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals, self.received = signals, None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "_SignalCatcher":
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class PlotCurves(Hook):
    """Writes ``output_dir/curves.png`` (each metric against step, a line a
    split) at the end of training (process 0 only)."""

    def __init__(self, output_dir: str, metrics: Sequence[str] = ("loss", "accuracy")) -> None:
        super().__init__()
        self.output_dir, self.metrics = output_dir, tuple(metrics)

    def on_end(self, loop: "Loop") -> None:
        if loop.is_main and loop.history:
            os.makedirs(self.output_dir, exist_ok=True)
            plot_history(loop.history, os.path.join(self.output_dir, "curves.png"), metrics=self.metrics)


def default_hooks(
    output_dir: str | None = None,
    *,
    eval_step: Callable | None = None,
    eval_data: Mapping[str, np.ndarray] | None = None,
    eval_every: int | None = None,
    eval_batch_size: int = 256,
    log_every: int = 50,
    checkpoint_every: int | None = None,
    resume: bool = False,
    extra: Mapping[str, Any] | None = None,
    logical_axes: Any = None,
    progress: bool = True,
    tensorboard: bool = True,
    plot: bool = True,
) -> list[Hook]:
    """The usual hooks, in the order they should run: preemption handling,
    a progress bar, train metrics every ``log_every`` steps, evaluation every
    ``eval_every`` steps (default once an epoch) and, with an ``output_dir``,
    checkpoints (default: at every evaluation; ``resume`` continues from the
    latest; ``extra`` and ``logical_axes`` as for ``Checkpoint``),
    ``metrics.jsonl``, TensorBoard events and ``curves.png``.

    Returns a list: add your own hooks to it (``EarlyStopping``, ...).
    """
    check_positive("default_hooks", "log_every", log_every)
    if (eval_step is None) != (eval_data is None):
        raise ValueError("default_hooks: eval_step and eval_data must be given together")
    if (resume or checkpoint_every) and output_dir is None:
        raise ValueError("default_hooks: resume and checkpoint_every need an output_dir")
    hooks: list[Hook] = []
    if output_dir is not None:
        hooks.append(Preemption())
    if progress:
        hooks.append(ProgressBar())
    hooks.append(TrainMetrics(every=log_every))
    if eval_step is not None:
        hooks.append(Evaluate(eval_step, eval_data, every=eval_every, batch_size=eval_batch_size))
    if output_dir is not None:
        hooks.append(Checkpoint(output_dir, every=checkpoint_every or eval_every, resume=resume, extra=extra,
                                logical_axes=logical_axes))
        hooks.append(MetricFiles(output_dir, tensorboard=tensorboard))
        if plot:
            hooks.append(PlotCurves(output_dir))
    return hooks
