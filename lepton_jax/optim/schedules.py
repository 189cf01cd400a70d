"""Learning-rate schedules (optax schedules) and a config to build them by name."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import optax

SCHEDULES = ("constant", "linear", "cosine", "step")


def constant(lr: float) -> optax.Schedule:
    """``lr`` at every step."""
    return optax.constant_schedule(lr)


def _check_warmup(where: str, warmup_steps: int, total_steps: int) -> None:
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"{where}: need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
            f"got warmup_steps={warmup_steps}, total_steps={total_steps}"
        )


def warmup_linear(peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0) -> optax.Schedule:
    """Linear 0 -> ``peak_lr`` over ``warmup_steps``, then linear to ``end_lr`` at ``total_steps``."""
    _check_warmup("warmup_linear", warmup_steps, total_steps)
    warmup = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    decay = optax.linear_schedule(peak_lr, end_lr, max(total_steps - warmup_steps, 1))
    return optax.join_schedules([warmup, decay], [warmup_steps])


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float = 0.0) -> optax.Schedule:
    """Linear 0 -> ``peak_lr`` over ``warmup_steps``, then a half cosine to ``end_lr`` at ``total_steps``."""
    _check_warmup("warmup_cosine", warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, end_lr)


def step_decay(lr: float, boundaries: Sequence[int], factor: float = 0.1) -> optax.Schedule:
    """``lr`` multiplied by ``factor`` at each step in ``boundaries``."""
    if list(boundaries) != sorted(boundaries) or any(b < 1 for b in boundaries):
        raise ValueError(f"step_decay: boundaries must be increasing positive steps, got {list(boundaries)}")
    return optax.piecewise_constant_schedule(lr, {int(b): factor for b in boundaries})


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """A schedule by name: "constant", "linear" or "cosine" (with warmup), or "step"."""

    name: str = "cosine"
    peak_lr: float = 1e-3
    warmup_steps: int = 0
    total_steps: int = 1
    end_lr: float = 0.0
    boundaries: tuple[int, ...] = ()
    factor: float = 0.1


def make_schedule(config: ScheduleConfig) -> optax.Schedule:
    """Builds the schedule ``config`` describes."""
    if config.name not in SCHEDULES:
        raise ValueError(f"make_schedule: unknown name {config.name!r}; expected one of {SCHEDULES}")
    if config.peak_lr < 0:
        raise ValueError(f"make_schedule: peak_lr must be >= 0, got {config.peak_lr}")
    if config.name == "constant":
        return constant(config.peak_lr)
    if config.name == "linear":
        return warmup_linear(config.peak_lr, config.warmup_steps, config.total_steps, config.end_lr)
    if config.name == "cosine":
        return warmup_cosine(config.peak_lr, config.warmup_steps, config.total_steps, config.end_lr)
    return step_decay(config.peak_lr, config.boundaries, config.factor)
