"""``fit``: a small training loop; everything else it does is a hook.

The loop draws a batch, runs ``train_step`` and calls the hooks that are due.
Evaluation, metric logging, checkpoints and resume, throughput, plots and
preemption handling are hooks (``train.hooks``); ``default_hooks`` builds the
usual set.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax

from lepton_jax.train.hooks import Hook, as_hook
from lepton_jax.train.logging import History, scalar_metrics
from lepton_jax.train.state import TrainState


@dataclasses.dataclass
class Loop:
    """What hooks see and may change while ``fit`` runs.

    Attributes:
      state: the current ``TrainState`` (a hook may replace it, e.g. on resume).
      step: the number of steps done (``state.step`` after the last step).
      total_steps: where the loop ends unless a hook stops it earlier.
      data: the batch iterator (``get_state``/``set_state`` for its position).
      metrics: the metrics the last train step returned (device arrays).
      eval_metrics: the latest evaluation, once an ``Evaluate`` hook ran.
      history: every row logged so far (``{"step", "split", **metrics}``).
      resumed_from: the step a checkpoint hook resumed from, else ``None``.
      start_step: the step this call started from (after any resume).
      stop_reason / preempted: set by ``request_stop``.
      is_main: whether this is process 0 (which alone writes logs and plots).
    """

    state: TrainState
    step: int
    total_steps: int
    data: Any
    hooks: Sequence[Hook] = ()
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    eval_metrics: dict[str, Any] | None = None
    history: History = dataclasses.field(default_factory=History)
    resumed_from: int | None = None
    stop_reason: str | None = None
    preempted: bool = False
    is_main: bool = True
    exit_stack: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)

    start_step: int = 0

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None

    @property
    def at_end(self) -> bool:
        """The last step: the planned end, or a stop that was not a preemption
        (hooks then run as at a planned end: a final eval, log and save)."""
        return self.step >= self.total_steps or (self.should_stop and not self.preempted)

    def request_stop(self, reason: str, *, preempted: bool = False) -> None:
        """Ends training after this step's hooks (the first reason is kept)."""
        if self.stop_reason is None:
            self.stop_reason, self.preempted = reason, preempted

    def log(self, split: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Records one row of scalar metrics: hooks may add entries to it
        (``on_row``), then every hook sees it (``on_log``). Returns the row."""
        row = {"step": self.step, "split": split, **scalar_metrics(metrics)}
        for hook in self.hooks:
            hook.on_row(self, row)
        self.history.append(row)
        for hook in self.hooks:
            hook.on_log(self, row)
        return row


@dataclasses.dataclass
class FitResult:
    """What ``fit`` returns: the final state, the logged rows and the last eval."""

    state: TrainState
    history: History
    eval_metrics: dict[str, Any] | None
    resumed_from: int | None
    preempted: bool = False
    stop_reason: str | None = None


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Any], tuple[TrainState, Mapping[str, Any]]],
    data: Iterator,
    *,
    num_steps: int | None = None,
    epochs: int | None = None,
    hooks: Sequence[Hook | Callable[[Loop], Any]] = (),
) -> FitResult:
    """Trains ``state`` with ``train_step`` on batches from ``data``.

    Args:
      state: the initial ``TrainState`` (also the restore target on resume).
      train_step: ``(state, batch) -> (state, metrics)``, e.g. from
        ``make_train_step``.
      data: a ``data.BatchIterator`` (its position is checkpointed).
      num_steps / epochs: how long to train (give exactly one); an epoch is
        ``data.steps_per_epoch`` steps. A resumed run ends at the same step.
      hooks: ``Hook`` objects (or plain ``fn(loop)`` callables, run every
        step), called in order after each step that is due for them
        (``hook.every``), e.g. ``default_hooks(eval_step=..., eval_data=...)``.
        Any hook can end training with ``loop.request_stop(reason)``.

    Returns:
      ``FitResult(state, history, eval_metrics, resumed_from, preempted, stop_reason)``.
    """
    total_steps = _total_steps(num_steps, epochs, data)
    hooks = [as_hook(hook) for hook in hooks]
    with contextlib.ExitStack() as exit_stack:
        loop = Loop(state=state, step=int(state.step), total_steps=total_steps, data=data, hooks=hooks,
                    is_main=jax.process_index() == 0, exit_stack=exit_stack)
        for hook in hooks:
            hook.on_start(loop)
        loop.start_step = loop.step
        while loop.step < total_steps and not loop.should_stop:
            loop.state, loop.metrics = train_step(loop.state, next(data))
            loop.step += 1
            for hook in hooks:
                hook.on_step(loop)
            for hook in hooks:
                if loop.step % hook.every == 0 or loop.at_end:
                    hook(loop)
        for hook in hooks:
            hook.on_end(loop)
    return FitResult(state=loop.state, history=loop.history, eval_metrics=loop.eval_metrics,
                     resumed_from=loop.resumed_from, preempted=loop.preempted, stop_reason=loop.stop_reason)


def _total_steps(num_steps: int | None, epochs: int | None, data: Any) -> int:
    if not hasattr(data, "__next__"):
        raise TypeError(f"fit: data must be an iterator of batches (a data.BatchIterator), got {type(data).__name__}")
    if (num_steps is None) == (epochs is None):
        raise ValueError(f"fit: give exactly one of num_steps and epochs, got num_steps={num_steps}, epochs={epochs}")
    if num_steps is not None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"fit: num_steps must be a positive int, got {num_steps!r}")
        return num_steps
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
    if not hasattr(data, "steps_per_epoch"):
        raise TypeError(f"fit: epochs needs data with steps_per_epoch (a data.BatchIterator), got {type(data).__name__}")
    return epochs * data.steps_per_epoch


__all__ = ["FitResult", "Loop", "fit"]
