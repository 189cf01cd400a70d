"""Hooks that watch a logged metric: early stopping and reducing the
learning rate when the metric stops improving."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

import jax
import optax
from optax.contrib import ReduceLROnPlateauState, reduce_on_plateau

from lepton_jax.train.hooks import Hook, check_positive

if TYPE_CHECKING:
    from lepton_jax.train.loop import Loop


def _check_mode(owner: str, mode: str) -> str:
    if mode not in ("min", "max"):
        raise ValueError(f"{owner}: mode must be 'min' or 'max', got {mode!r}")
    return mode


class EarlyStopping(Hook):
    """Stops training when ``metric`` of the ``split`` rows (default: each
    evaluation) has not improved by more than ``min_delta`` for ``patience``
    rows in a row.

    Args:
      metric: a logged metric, e.g. ``"loss"`` or ``"accuracy"``.
      mode: ``"min"`` (lower is better) or ``"max"``.
      patience: rows without improvement before stopping (>= 1).
      min_delta: the least change that counts as an improvement (>= 0).
      restore_best: at the end, ``loop.state`` (so ``fit``'s result) is the
        state of the best row, kept as a device copy while training.
      split: which rows to watch (``"eval"`` or ``"train"``).

    After training, ``best``, ``best_step`` and ``stopped_step`` tell what happened.
    """

    def __init__(self, metric: str, mode: str = "min", patience: int = 3, min_delta: float = 0.0,
                 restore_best: bool = False, split: str = "eval") -> None:
        super().__init__()
        self.metric, self.mode, self.split = metric, _check_mode("EarlyStopping", mode), split
        check_positive("EarlyStopping", "patience", patience)
        if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
            raise ValueError(f"EarlyStopping: min_delta must be a number >= 0, got {min_delta!r}")
        self.patience, self.min_delta, self.restore_best = patience, float(min_delta), restore_best
        self.best: float | None = None
        self.best_step: int | None = None
        self.stopped_step: int | None = None
        self._waited = 0
        self._best_state = None

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_log(self, loop: "Loop", row: Mapping[str, Any]) -> None:
        if row["split"] != self.split:
            return
        if self.metric not in row:
            raise KeyError(f"EarlyStopping: metric {self.metric!r} is not in the {self.split} rows, "
                           f"which have {sorted(k for k in row if k not in ('step', 'split'))}")
        value = float(row[self.metric])
        if self._improved(value):
            self.best, self.best_step, self._waited = value, loop.step, 0
            if self.restore_best:
                # A copy: a train step that donates its input would free these buffers.
                self._best_state = jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, loop.state)
            return
        self._waited += 1
        if self._waited >= self.patience:
            self.stopped_step = loop.step
            loop.request_stop(f"early stopping: {self.split} {self.metric} has not improved on {self.best:.6g} "
                              f"(step {self.best_step}) for {self.patience} evaluations")

    def on_end(self, loop: "Loop") -> None:
        if self.restore_best and self._best_state is not None:
            loop.state = self._best_state


class ReduceLROnPlateau(Hook):
    """Scales the learning rate by ``factor`` when ``metric`` of the ``split``
    rows has not improved for ``patience`` rows, with optax's
    ``optax.contrib.reduce_on_plateau`` deciding.

    The optimizer carries the scale: end its chain with ``hook.transform()``,
    e.g. ``optax.chain(optax.adamw(1e-3), hook.transform())``. That
    transform multiplies the updates by the current scale and holds optax's
    ``ReduceLROnPlateauState`` inside the optimizer state, so the scale is
    checkpointed and a resumed run goes on with it. The hook updates that
    state from each watched row (``mode="max"`` watches the negated metric).

    Args: as ``optax.contrib.reduce_on_plateau`` (``factor``, ``patience``,
      ``rtol``, ``atol``, ``cooldown``, ``min_scale``), counted in rows.

    ``scale`` is the current factor on the learning rate.
    """

    def __init__(self, metric: str = "loss", mode: str = "min", *, factor: float = 0.1, patience: int = 3,
                 rtol: float = 1e-4, atol: float = 0.0, cooldown: int = 0, min_scale: float = 0.0,
                 split: str = "eval") -> None:
        super().__init__()
        self.metric, self.mode, self.split = metric, _check_mode("ReduceLROnPlateau", mode), split
        self._plateau = reduce_on_plateau(factor=factor, patience=patience, rtol=rtol, atol=atol,
                                          cooldown=cooldown, min_scale=min_scale)
        self._update = jax.jit(lambda state, value: self._plateau.update({}, state, value=value)[1])
        self.scale = 1.0

    def transform(self) -> optax.GradientTransformation:
        """The optimizer's last transform: updates times the current scale."""

        def update_fn(updates, state, params=None):
            del params
            return jax.tree.map(lambda g: (state.scale * g).astype(g.dtype), updates), state

        return optax.GradientTransformation(self._plateau.init, update_fn)

    def on_log(self, loop: "Loop", row: Mapping[str, Any]) -> None:
        if row["split"] != self.split or self.metric not in row:
            return
        value = float(row[self.metric]) * (1.0 if self.mode == "min" else -1.0)
        found = []

        def step(node):
            if not isinstance(node, ReduceLROnPlateauState):
                return node
            new = self._update(node, value)
            found.append(float(new.scale))
            # Keep each leaf where it was (a sharded train step expects it there).
            return jax.tree.map(lambda n, o: jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n, new, node)

        opt_state = jax.tree.map(step, loop.state.opt_state, is_leaf=lambda x: isinstance(x, ReduceLROnPlateauState))
        if not found:
            raise ValueError("ReduceLROnPlateau: the optimizer state holds no plateau state; "
                             "end the optimizer's chain with hook.transform()")
        if found[0] < self.scale and loop.is_main:
            print(f"ReduceLROnPlateau: step {loop.step}: {self.split} {self.metric} has not improved; "
                  f"learning rate scale {self.scale:.4g} -> {found[0]:.4g}", flush=True)
        self.scale = found[0]
        loop.state = loop.state.replace(opt_state=opt_state)
