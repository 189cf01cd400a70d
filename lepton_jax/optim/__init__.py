"""Optimizers as optax transformations: presets, schedules, weight-decay masks,
clipping, gradient accumulation and parameter EMA."""

from lepton_jax.optim.ema import ParameterEmaState, ema_params, parameter_ema
from lepton_jax.optim.masks import decay_mask
from lepton_jax.optim.presets import (
    INJECTABLE,
    OPTIMIZERS,
    OptimizerConfig,
    adafactor,
    adagrad,
    adam,
    adamw,
    lion,
    make_optimizer,
    momentum,
    nesterov,
    set_hyperparams,
    sgd,
)
from lepton_jax.optim.schedules import (
    ScheduleConfig,
    constant,
    make_schedule,
    step_decay,
    warmup_cosine,
    warmup_linear,
)

__all__ = [
    "INJECTABLE", "OPTIMIZERS", "OptimizerConfig", "ParameterEmaState", "ScheduleConfig", "adafactor", "adagrad", "adam",
    "adamw", "constant", "decay_mask", "ema_params", "lion", "make_optimizer", "make_schedule", "momentum",
    "nesterov", "parameter_ema", "set_hyperparams", "sgd", "step_decay", "warmup_cosine", "warmup_linear",
]
