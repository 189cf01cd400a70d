"""An exponential moving average of the parameters, as an optax transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class ParameterEmaState(NamedTuple):
    """``ema`` (biased when debiasing) and ``correction`` = ``1 - decay**count``
    (1 without debiasing)."""

    count: jax.Array
    correction: jax.Array
    ema: PyTree


def parameter_ema(decay: float, *, debias: bool = True) -> optax.GradientTransformation:
    """Tracks ``ema = decay * ema + (1 - decay) * new_params`` where
    ``new_params = params + updates``; passes ``updates`` through unchanged.

    Put it last in a chain so ``updates`` are the final ones. Under
    ``optax.MultiSteps`` (gradient accumulation) it belongs inside the
    accumulated chain, where it is called only when an update is applied.
    With ``debias`` the EMA starts at 0 and is divided by ``1 - decay**count``
    (as Adam's moments); without, it starts at the initial parameters.
    Read it with ``ema_params(opt_state)``.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"parameter_ema: decay must be in [0, 1), got {decay}")

    def init_fn(params):
        ema = jax.tree.map(jnp.zeros_like if debias else jnp.array, params)
        return ParameterEmaState(count=jnp.zeros((), jnp.int32), correction=jnp.ones((), jnp.float32), ema=ema)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("parameter_ema: update needs params (call tx.update(grads, state, params))")
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), state.ema, new_params)
        count = state.count + 1
        correction = 1.0 - decay ** count.astype(jnp.float32) if debias else state.correction
        return updates, ParameterEmaState(count=count, correction=correction, ema=ema)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state: PyTree) -> PyTree:
    """The (debiased) parameter EMA held anywhere inside ``opt_state``."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ParameterEmaState))
             if isinstance(s, ParameterEmaState)]
    if len(found) != 1:
        raise ValueError(f"ema_params: opt_state must hold exactly one parameter_ema state, found {len(found)}")
    state = found[0]
    return jax.tree.map(lambda e: e / state.correction.astype(e.dtype), state.ema)
