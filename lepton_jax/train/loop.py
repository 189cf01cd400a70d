"""``fit``: the training loop with evaluation, logging, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from lepton_jax.checkpoint import CheckpointManager
from lepton_jax.data import BatchIterator, iterate_once
from lepton_jax.train.logging import MetricLogger, plot_history, scalar_metrics
from lepton_jax.train.state import TrainState
from lepton_jax.train.step import evaluate


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: the final state, the logged rows and the last eval."""

    state: TrainState
    history: list[dict[str, Any]]
    eval_metrics: dict[str, Any] | None
    resumed_from: int | None


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
        always at the end); needs ``output_dir``.
      resume: continue from the latest checkpoint in ``output_dir`` if any:
        the state, the step and the data position are restored, so the run
        continues exactly as if it had not stopped.
      progress: show a progress bar (``tqdm.auto``, a widget in notebooks).
      extra: JSON saved with each checkpoint beside the data position.
      tokens_per_step / flops_per_step / peak_flops: when given, train rows
        also carry ``tokens_per_second`` and ``mfu`` (model FLOPs over the
        devices' peak; ``peak_flops`` is for all devices together).
      eval_transform: adds derived entries to each eval result (e.g. bits per byte).

    Returns:
      ``FitResult(state, history, eval_metrics, resumed_from)``.
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
        manager = CheckpointManager(os.path.join(output_dir, "checkpoints"), max_to_keep=max_to_keep)
        if resume and manager.latest_step() is not None:
            resumed_from = manager.latest_step()
            state = manager.restore(resumed_from, target=state)
            train_data.set_state(manager.extra(resumed_from)["data"])

    start = int(state.step)
    eval_metrics = None
    bar = _progress_bar(total_steps, start, progress and main)
    window: list[dict[str, jax.Array]] = []
    window_start = time.perf_counter()
    try:
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
                manager.save(step, state, extra={**(extra or {}), "data": train_data.get_state(), "step": step})
            bar.update(1)
    finally:
        bar.close()
        if manager is not None:
            manager.close()
        logger.close()

    if plot and main and output_dir is not None and logger.history:
        plot_history(logger.history, os.path.join(output_dir, "curves.png"))
    return FitResult(state=state, history=logger.history, eval_metrics=eval_metrics, resumed_from=resumed_from)


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
