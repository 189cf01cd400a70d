"""Named optimizers: optax chains of clipping, weight decay, the update rule,
parameter EMA and gradient accumulation, built from one frozen config."""

from __future__ import annotations

import dataclasses
from typing import Any

import optax

from lepton_jax.optim.ema import parameter_ema
from lepton_jax.optim.masks import decay_mask
from lepton_jax.optim.schedules import ScheduleConfig, make_schedule

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "adagrad", "lion", "adafactor")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer by name.

    ``learning_rate`` is a float or a ``ScheduleConfig``. ``b1``/``b2``/``eps``
    of ``None`` take the optimizer's own default. ``weight_decay`` is
    decoupled for adamw, lion and adafactor and coupled (added to the gradient,
    i.e. L2) for the others; ``decay_mask="auto"`` skips biases and norm
    scales, ``None`` decays everything. ``clip_norm`` clips the gradient's
    global norm first. ``accumulate_steps > 1`` averages that many
    micro-batch gradients per update (``optax.MultiSteps``). ``ema_decay``
    keeps a parameter EMA (read it with ``ema_params``).
    """

    name: str = "adamw"
    learning_rate: float | ScheduleConfig = 1e-3
    b1: float | None = None
    b2: float | None = None
    eps: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    decay_mask: str | None = "auto"
    clip_norm: float | None = None
    accumulate_steps: int = 1
    ema_decay: float | None = None


def _kwargs(**maybe) -> dict[str, Any]:
    return {k: v for k, v in maybe.items() if v is not None}


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """Builds the optax transformation ``config`` describes."""
    if config.name not in OPTIMIZERS:
        raise ValueError(f"make_optimizer: unknown name {config.name!r}; expected one of {OPTIMIZERS}")
    if isinstance(config.learning_rate, ScheduleConfig):
        lr = make_schedule(config.learning_rate)
    elif isinstance(config.learning_rate, (int, float)) and config.learning_rate >= 0:
        lr = float(config.learning_rate)
    else:
        raise ValueError(
            f"make_optimizer: learning_rate must be a float >= 0 or a ScheduleConfig, got {config.learning_rate!r}"
        )
    if config.weight_decay < 0:
        raise ValueError(f"make_optimizer: weight_decay must be >= 0, got {config.weight_decay}")
    if not isinstance(config.accumulate_steps, int) or config.accumulate_steps < 1:
        raise ValueError(f"make_optimizer: accumulate_steps must be an int >= 1, got {config.accumulate_steps!r}")
    if config.decay_mask not in ("auto", None):
        raise ValueError(f"make_optimizer: decay_mask must be 'auto' or None, got {config.decay_mask!r}")
    if config.clip_norm is not None and config.clip_norm <= 0:
        raise ValueError(f"make_optimizer: clip_norm must be > 0, got {config.clip_norm}")
    mask = decay_mask if config.decay_mask == "auto" else None
    wd = config.weight_decay
    betas = _kwargs(b1=config.b1, b2=config.b2, eps=config.eps)

    parts: list[optax.GradientTransformation] = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    coupled = config.name in ("sgd", "momentum", "nesterov", "adam", "adagrad")
    if coupled and wd > 0:
        parts.append(optax.add_decayed_weights(wd, mask))
    name = config.name
    if name == "sgd":
        parts.append(optax.sgd(lr))
    elif name in ("momentum", "nesterov"):
        parts.append(optax.sgd(lr, momentum=config.momentum, nesterov=name == "nesterov"))
    elif name == "adam":
        parts.append(optax.adam(lr, **betas))
    elif name == "adamw":
        parts.append(optax.adamw(lr, weight_decay=wd, mask=mask, **betas))
    elif name == "adagrad":
        parts.append(optax.adagrad(lr, **_kwargs(eps=config.eps)))
    elif name == "lion":
        parts.append(optax.lion(lr, weight_decay=wd, mask=mask, **_kwargs(b1=config.b1, b2=config.b2)))
    else:  # adafactor
        parts.append(optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=mask,
                                     **_kwargs(eps=config.eps)))
    if config.ema_decay is not None:
        parts.append(parameter_ema(config.ema_decay))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    if config.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps).gradient_transformation()
    return tx


def _preset(name: str):
    def build(learning_rate: float | ScheduleConfig = 1e-3, **options: Any) -> optax.GradientTransformation:
        return make_optimizer(OptimizerConfig(name=name, learning_rate=learning_rate, **options))

    build.__name__ = name
    build.__doc__ = (f"``make_optimizer(OptimizerConfig(name={name!r}, learning_rate=..., **options))``; "
                     "options are the other ``OptimizerConfig`` fields.")
    return build


sgd = _preset("sgd")
momentum = _preset("momentum")
nesterov = _preset("nesterov")
adam = _preset("adam")
adamw = _preset("adamw")
adagrad = _preset("adagrad")
lion = _preset("lion")
adafactor = _preset("adafactor")
