"""Named optimizers: optax chains of clipping, L2, the update rule, decoupled
weight decay, the learning rate, parameter EMA and gradient accumulation,
built from one frozen config. ``optim.adamw(1e-3)`` is ``optax.adamw(1e-3)``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from lepton_jax.optim.ema import parameter_ema
from lepton_jax.optim.masks import decay_mask
from lepton_jax.optim.schedules import ScheduleConfig, make_schedule

@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer by name, meaning what the optax alias of that name means.

    ``learning_rate`` is a float or a ``ScheduleConfig``. ``b1``/``b2``/``eps``
    of ``None`` take the optimizer's own default. ``weight_decay`` is
    decoupled weight decay (``optax.add_decayed_weights`` after the update
    rule), taken by adamw, lion and adafactor; ``None`` is optax's default
    (adamw 1e-4, lion 1e-3, adafactor none). ``l2`` adds ``l2 * params`` to the
    gradient before the update rule (plain L2 regularization) for any
    optimizer. ``decay_mask``: ``None`` decays every parameter (optax's
    default), ``"auto"`` skips biases and norm scales (``optim.decay_mask``).
    ``clip_norm`` clips the gradient's global norm first.
    ``accumulate_steps > 1`` averages that many micro-batch gradients per
    update (``optax.MultiSteps``). ``ema_decay`` keeps a parameter EMA (read
    it with ``ema_params``).
    """

    name: str = "adamw"
    learning_rate: float | ScheduleConfig = 1e-3
    b1: float | None = None
    b2: float | None = None
    eps: float | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    l2: float = 0.0
    decay_mask: str | None = None
    clip_norm: float | None = None
    accumulate_steps: int = 1
    ema_decay: float | None = None


def _kwargs(**maybe) -> dict[str, Any]:
    return {k: v for k, v in maybe.items() if v is not None}


# The update rule of each name, without weight decay or the learning rate:
# the transforms optax's alias of that name chains before them.
_RULES: dict[str, Callable[[OptimizerConfig], list[optax.GradientTransformation]]] = {
    "sgd": lambda c: [],
    "momentum": lambda c: [optax.trace(decay=c.momentum)],
    "nesterov": lambda c: [optax.trace(decay=c.momentum, nesterov=True)],
    "adam": lambda c: [optax.scale_by_adam(**_kwargs(b1=c.b1, b2=c.b2, eps=c.eps))],
    "adamw": lambda c: [optax.scale_by_adam(**_kwargs(b1=c.b1, b2=c.b2, eps=c.eps))],
    "adagrad": lambda c: [optax.scale_by_rss(initial_accumulator_value=0.1, **_kwargs(eps=c.eps))],
    "lion": lambda c: [optax.scale_by_lion(**_kwargs(b1=c.b1, b2=c.b2))],
}
# Decoupled weight decay: optax's default for the names that take it.
_DECOUPLED_DEFAULT = {"adamw": 1e-4, "lion": 1e-3, "adafactor": None}
OPTIMIZERS = (*_RULES, "adafactor")


def _learning_rate(config: OptimizerConfig) -> float | optax.Schedule:
    if isinstance(config.learning_rate, ScheduleConfig):
        return make_schedule(config.learning_rate)
    if isinstance(config.learning_rate, (int, float)) and config.learning_rate >= 0:
        return float(config.learning_rate)
    raise ValueError(
        f"make_optimizer: learning_rate must be a float >= 0 or a ScheduleConfig, got {config.learning_rate!r}"
    )


def _check(config: OptimizerConfig) -> None:
    if config.name not in OPTIMIZERS:
        raise ValueError(f"make_optimizer: unknown name {config.name!r}; expected one of {OPTIMIZERS}")
    if config.weight_decay is not None:
        if config.name not in _DECOUPLED_DEFAULT:
            raise ValueError(
                f"make_optimizer: weight_decay is decoupled weight decay, which {config.name!r} does not take "
                f"(optax.{config.name} has none); use one of {tuple(_DECOUPLED_DEFAULT)}, or l2={config.weight_decay} "
                "to add L2 to the gradient")
        if config.weight_decay < 0:
            raise ValueError(f"make_optimizer: weight_decay must be >= 0, got {config.weight_decay}")
    if config.l2 < 0:
        raise ValueError(f"make_optimizer: l2 must be >= 0, got {config.l2}")
    if not isinstance(config.accumulate_steps, int) or config.accumulate_steps < 1:
        raise ValueError(f"make_optimizer: accumulate_steps must be an int >= 1, got {config.accumulate_steps!r}")
    if config.decay_mask not in ("auto", None):
        raise ValueError(f"make_optimizer: decay_mask must be 'auto' or None, got {config.decay_mask!r}")
    if config.clip_norm is not None and config.clip_norm <= 0:
        raise ValueError(f"make_optimizer: clip_norm must be > 0, got {config.clip_norm}")


INJECTABLE = ("learning_rate", "weight_decay")


def make_optimizer(config: OptimizerConfig, *, inject: Sequence[str] = ()) -> optax.GradientTransformation:
    """Builds the optax chain ``config`` describes: clipping, L2, the update
    rule, decoupled weight decay, the learning rate, then the parameter EMA,
    all inside gradient accumulation when asked.

    ``inject`` names hyperparameters (``INJECTABLE``) to hold as arrays in the
    optimizer state (``optax.inject_hyperparams``), so that one program can
    train members that differ in them (``vmap`` over states whose values
    ``set_hyperparams`` sets). An injected ``learning_rate`` is the peak of a
    ``ScheduleConfig``: the schedule is scaled by ``value / peak_lr``.
    """
    _check(config)
    lr = _learning_rate(config)
    mask = decay_mask if config.decay_mask == "auto" else None
    weight_decay = _DECOUPLED_DEFAULT.get(config.name) if config.weight_decay is None else config.weight_decay
    inject = tuple(inject)
    for name in inject:
        if name not in INJECTABLE:
            raise ValueError(f"make_optimizer: inject takes names from {INJECTABLE}, got {name!r}")
    if "weight_decay" in inject and (config.name not in _DECOUPLED_DEFAULT or config.name == "adafactor"):
        raise ValueError(f"make_optimizer: inject=('weight_decay',) needs adamw or lion, got {config.name!r}")
    if not inject:
        tx = _chain(config, lr, weight_decay, mask)
    else:
        schedule = lr if callable(lr) else None
        peak = config.learning_rate.peak_lr if schedule is not None else None
        if "learning_rate" in inject and schedule is not None and peak <= 0:
            raise ValueError(f"make_optimizer: an injected learning rate scales the schedule by value / peak_lr; "
                             f"peak_lr must be > 0, got {peak}")

        def factory(learning_rate: Any, weight_decay: Any) -> optax.GradientTransformation:
            rate = learning_rate
            if "learning_rate" in inject and schedule is not None:
                rate = lambda count: schedule(count) * (learning_rate / peak)  # noqa: E731
            return _chain(config, rate, weight_decay, mask)

        static = tuple(name for name in INJECTABLE if name not in inject)
        initial = {"learning_rate": peak if schedule is not None and "learning_rate" in inject else lr,
                   "weight_decay": weight_decay or 0.0 if "weight_decay" in inject else weight_decay}
        tx = optax.inject_hyperparams(factory, static_args=static)(**initial)
    if config.accumulate_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=config.accumulate_steps).gradient_transformation()
    return tx


def _chain(config: OptimizerConfig, lr: Any, weight_decay: Any, mask: Any) -> optax.GradientTransformation:
    parts: list[optax.GradientTransformation] = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    if config.l2 > 0:
        parts.append(optax.add_decayed_weights(config.l2, mask))
    if config.name == "adafactor":  # its own chain: factored second moments, clipping, decay, the rate
        parts.append(optax.adafactor(lr, weight_decay_rate=weight_decay or None, weight_decay_mask=mask,
                                     **_kwargs(eps=config.eps)))
    else:
        parts += _RULES[config.name](config)
        # An injected weight decay is an array (never skipped); a static one of 0 adds nothing.
        if weight_decay is not None and (not isinstance(weight_decay, (int, float)) or weight_decay):
            parts.append(optax.add_decayed_weights(weight_decay, mask))
        parts.append(optax.scale_by_learning_rate(lr))
    if config.ema_decay is not None:
        parts.append(parameter_ema(config.ema_decay))
    return optax.chain(*parts)


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def set_hyperparams(opt_state: Any, **values: Any) -> Any:
    """``opt_state`` with the injected hyperparameters ``values`` (arrays of
    the state's batch shape, e.g. ``[K]`` for a population) replaced.

    Raises ``ValueError`` naming a hyperparameter the state does not inject.
    """
    found = []

    def replace(node: Any) -> Any:
        if isinstance(node, _INJECTED):
            missing = sorted(set(values) - set(node.hyperparams))
            if missing:
                raise ValueError(f"set_hyperparams: the optimizer injects {sorted(node.hyperparams)}, "
                                 f"got {missing}")
            found.append(node)
            hyperparams = dict(node.hyperparams)
            for name, value in values.items():
                old = hyperparams[name]
                hyperparams[name] = jnp.broadcast_to(jnp.asarray(value, old.dtype), jnp.shape(old))
            return node._replace(hyperparams=hyperparams)
        return node

    new_state = jax.tree.map(replace, opt_state, is_leaf=lambda n: isinstance(n, _INJECTED))
    if not found:
        raise ValueError("set_hyperparams: opt_state has no injected hyperparameters "
                         "(build the optimizer with make_optimizer(..., inject=(...)))")
    return new_state


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
