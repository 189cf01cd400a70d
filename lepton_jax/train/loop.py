"""``fit``: the training loop with evaluation, logging, checkpoints and resume."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from lepton_jax.checkpoint import CheckpointManager
from lepton_jax.data import BatchIterator, iterate_once
from lepton_jax.train.logging import History, MetricLogger, plot_history, scalar_metrics
from lepton_jax.train.state import TrainState
from lepton_jax.train.step import evaluate


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: the final state, the logged rows and the last eval."""

    state: TrainState
    history: History
    eval_metrics: dict[str, Any] | None
    resumed_from: int | None
    preempted: bool = False


def fit(
    state: TrainState,
    train_step: Callable,
    train_data: BatchIterator,
    *,
    num_steps: int | None = None,
    epochs: int | None = None,
    eval_step: Callable | None = None,
    eval_data: Mapping[str, np.ndarray] | None = None,
    eval_batch_size: int = 256,
    eval_every: int | None = None,
    log_every: int = 50,
    output_dir: str | None = None,
    checkpoint_every: int | None = None,
    max_to_keep: int = 3,
    checkpoint_options: Mapping[str, Any] | None = None,
    logical_axes: Any = None,
    resume: bool = False,
    progress: bool = True,
    tensorboard: bool = True,
    plot: bool = True,
    extra: Mapping[str, Any] | None = None,
    tokens_per_step: int | None = None,
    flops_per_step: float | None = None,
    peak_flops: float | None = None,
    eval_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> FitResult:
    """Trains ``state`` with ``train_step`` on batches from ``train_data``.

    Args:
      state: the initial ``TrainState`` (also the restore target on resume).
      train_step: ``(state, batch) -> (state, metrics)``, e.g. from
        ``make_train_step``.
      train_data: a ``BatchIterator``; its position is checkpointed.
      num_steps / epochs: how long to train (give exactly one); an epoch is
        ``train_data.steps_per_epoch`` steps.
      eval_step / eval_data: optional evaluation (``make_eval_step`` and a dict
        of arrays, iterated once in padded batches of ``eval_batch_size``),
        every ``eval_every`` steps (default: once an epoch) and at the end.
      log_every: steps between train-metric rows (means over the window).
      output_dir: where ``metrics.jsonl``, TensorBoard events, ``curves.png``
        and ``checkpoints/`` go; ``None`` keeps everything in memory.
      checkpoint_every: steps between checkpoints (default: every eval, and
        always at the end); needs ``output_dir``. Each checkpoint carries the
        latest eval metrics (for ``best_metric`` retention).
      max_to_keep / checkpoint_options: ``CheckpointManager`` settings (e.g.
        ``{"keep_every_n_steps": 1000, "best_metric": "loss"}``).
      logical_axes: the params' logical axis names, saved with checkpoints so
        they can be restored onto another mesh (``parallel.param_logical_axes``).
      resume: continue from the latest readable checkpoint in ``output_dir``
        if any: the state, the step and the data position are restored, so
        the run continues exactly as if it had not stopped.
      progress: show a progress bar (``tqdm.auto``, a widget in notebooks).
      extra: JSON saved with each checkpoint beside the data position.
      tokens_per_step / flops_per_step / peak_flops: when given, train rows
        also carry ``tokens_per_second`` and ``mfu`` (model FLOPs over the
        devices' peak; ``peak_flops`` is for all devices together).
      eval_transform: adds derived entries to each eval result (e.g. bits per byte).

    Returns:
      ``FitResult(state, history, eval_metrics, resumed_from, preempted)``.

    Preemption: with an ``output_dir``, SIGTERM or SIGINT during ``fit`` (from
    the main thread) saves a checkpoint at the next step boundary, waits for
    the write and returns with ``preempted=True``; ``resume=True`` continues.
    """
    total_steps = _total_steps(num_steps, epochs, train_data)
    for name, value in (("log_every", log_every), ("eval_every", eval_every),
                        ("checkpoint_every", checkpoint_every), ("eval_batch_size", eval_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"fit: {name} must be a positive int, got {value!r}")
    if (eval_step is None) != (eval_data is None):
        raise ValueError("fit: eval_step and eval_data must be given together")
    if (resume or checkpoint_every) and output_dir is None:
        raise ValueError("fit: resume and checkpoint_every need an output_dir")
    if eval_every is None:
        eval_every = train_data.steps_per_epoch
    if checkpoint_every is None:
        checkpoint_every = eval_every

    # With several processes only the first writes logs, plots and the bar;
    # every process takes part in checkpoint saves (Orbax coordinates them).
    main = jax.process_index() == 0
    logger = MetricLogger(output_dir if main else None, tensorboard=tensorboard)
    manager = None
    resumed_from = None
    if output_dir is not None:
        manager = CheckpointManager(os.path.join(output_dir, "checkpoints"), max_to_keep=max_to_keep,
                                    **dict(checkpoint_options or {}))
        if resume and manager.latest_step() is not None:
            state = manager.restore(target=state)  # skips a damaged latest step with a warning
            resumed_from = int(state.step)
            train_data.set_state(manager.extra(resumed_from)["data"])

    start = int(state.step)
    eval_metrics = None
    bar = _progress_bar(total_steps, start, progress and main)
    window: list[dict[str, jax.Array]] = []
    window_start = time.perf_counter()
    preempted = False
    stop_signal = _StopSignal(enabled=manager is not None)

    def save(step: int, force: bool = False) -> None:
        metrics = {k: v for k, v in (eval_metrics or {}).items() if isinstance(v, (int, float, np.floating))}
        manager.save(step, state, metrics=metrics, force=force, logical_axes=logical_axes,
                     extra={**(extra or {}), "data": train_data.get_state(), "step": step})

    try:
        stop_signal.__enter__()
        for step in range(start + 1, total_steps + 1):
            state, metrics = train_step(state, next(train_data))
            window.append(metrics)
            if step % log_every == 0 or step == total_steps:
                means = {k: float(np.mean([jax.device_get(m[k]) for m in window])) for k in window[0]}
                means["steps_per_second"] = len(window) / max(time.perf_counter() - window_start, 1e-9)
                if tokens_per_step:
                    means["tokens_per_second"] = means["steps_per_second"] * tokens_per_step
                if flops_per_step and peak_flops:
                    means["mfu"] = means["steps_per_second"] * flops_per_step / peak_flops
                means["epoch"] = train_data.epoch
                row = logger.log(step, "train", means)
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k in ("loss", "accuracy", "tokens_per_second")})
                window, window_start = [], time.perf_counter()
            if eval_step is not None and (step % eval_every == 0 or step == total_steps):
                eval_metrics = evaluate(state, eval_step, iterate_once(eval_data, eval_batch_size, pad=True))
                if eval_transform is not None:
                    eval_metrics = {**eval_metrics, **eval_transform(eval_metrics)}
                logger.log(step, "eval", eval_metrics)
            if manager is not None and (step % checkpoint_every == 0 or step == total_steps):
                save(step)
            bar.update(1)
            if stop_signal.received is not None and step < total_steps:
                save(step, force=True)
                manager.wait()
                preempted = True
                if main:
                    print(f"fit: {signal.Signals(stop_signal.received).name} received; saved step {step} "
                          f"to {manager.directory}; resume=True continues", flush=True)
                break
    finally:
        stop_signal.__exit__()
        bar.close()
        if manager is not None:
            manager.close()
        logger.close()

    if plot and main and output_dir is not None and logger.history:
        plot_history(logger.history, os.path.join(output_dir, "curves.png"))
    return FitResult(state=state, history=History(logger.history), eval_metrics=eval_metrics, resumed_from=resumed_from,
                     preempted=preempted)


class _StopSignal(contextlib.AbstractContextManager):
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries (only
    from the main thread, where Python delivers signals)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum

    def __enter__(self) -> "_StopSignal":
        if self.enabled:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _total_steps(num_steps: int | None, epochs: int | None, train_data: Any) -> int:
    if not hasattr(train_data, "get_state") or not hasattr(train_data, "__next__"):
        raise TypeError(
            f"fit: train_data must be a lepton_jax.data.BatchIterator, got {type(train_data).__name__}"
        )
    if (num_steps is None) == (epochs is None):
        raise ValueError(f"fit: give exactly one of num_steps and epochs, got num_steps={num_steps}, epochs={epochs}")
    if num_steps is not None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"fit: num_steps must be a positive int, got {num_steps!r}")
        return num_steps
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    return epochs * train_data.steps_per_epoch


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


__all__ = ["FitResult", "fit"]
