"""SPMD train steps: one ``jax.jit`` with shardings from the rules, and
``shard_map`` / ``pmap`` data-parallel paths that compute the same numbers."""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lepton_jax.parallel.rules import (
    Rules, batch_sharding, get_rules, opt_state_shardings, param_shardings, restrict_to_mesh)
from lepton_jax.nnx import as_model
from lepton_jax.train.loss_scale import as_loss_scale
from lepton_jax.train.state import TrainState, create_train_state
from lepton_jax.train.step import LossFn, make_train_step


def _in_context(fn: Callable, mesh: Mesh, rules: Rules) -> Callable:
    """Calls (and so traces) the jitted ``fn`` with the mesh and logical rules
    active, so the models' ``with_logical_constraint`` calls resolve to mesh
    axes. ``jax.set_mesh`` must wrap the call: it is refused inside a trace."""

    rules = restrict_to_mesh(get_rules(rules), mesh)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    def lower(*args, **kwargs):
        """``fn.trace(*args).lower()`` under the mesh and rules (then
        ``.compile().memory_analysis()``, ``.as_text()``)."""
        with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
            return fn.trace(*args, **kwargs).lower()

    wrapped.lower = lower
    return wrapped


def param_logical_axes(model: linen.Module, example_inputs: jax.Array) -> Any:
    """The params tree with each leaf replaced by its logical axis names
    (a ``PartitionSpec`` of names, empty for unannotated leaves); what
    ``CheckpointManager.save(logical_axes=...)`` stores for re-sharding."""
    model = as_model(model)  # an nnx.Module: its parameters' sharding names
    example = jax.ShapeDtypeStruct(np.shape(example_inputs), np.asarray(example_inputs).dtype)
    boxed = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), example)
    return linen.get_partition_spec(boxed["params"])


def state_shardings(model: linen.Module, tx: optax.GradientTransformation, example_inputs: jax.Array,
                    mesh: Mesh, rules: str | Rules, *, loss_scale: Any = None) -> TrainState:
    """The ``TrainState`` of shardings the rules give ``model``'s parameters,
    the optimizer state mirroring them, everything else replicated
    (``loss_scale`` as for ``create_train_state``)."""
    model = as_model(model)  # an nnx.Module: its parameters' sharding names
    example = jax.ShapeDtypeStruct(np.shape(example_inputs), np.asarray(example_inputs).dtype)
    boxed = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), example)
    params_sh = param_shardings(boxed["params"], mesh, rules)
    abstract_params = linen.meta.unbox(boxed["params"])
    replicated = NamedSharding(mesh, PartitionSpec())
    model_state = {k: jax.tree.map(lambda _: replicated, linen.meta.unbox(v)) for k, v in boxed.items()
                   if k != "params"}
    return TrainState(step=replicated, params=params_sh,
                      opt_state=opt_state_shardings(tx, abstract_params, params_sh, mesh),
                      model_state=model_state, rng=replicated,
                      loss_scale=jax.tree.map(lambda _: replicated, as_loss_scale(loss_scale)))


def create_sharded_train_state(model: linen.Module, tx: optax.GradientTransformation, example_inputs: jax.Array,
                               mesh: Mesh, rules: str | Rules, *, seed: int = 0,
                               loss_scale: Any = None) -> tuple[TrainState, TrainState]:
    """Initialises the state directly into its shardings (no full copy on one
    device first). Returns ``(state, shardings)``."""
    rules = get_rules(rules)
    shardings = state_shardings(model, tx, example_inputs, mesh, rules, loss_scale=loss_scale)
    create = _in_context(jax.jit(lambda x: create_train_state(model, tx, x, seed=seed, loss_scale=loss_scale),
                                 out_shardings=shardings),
                         mesh, rules)
    return create(np.asarray(example_inputs)[:1]), shardings


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: str | Rules) -> dict[str, jax.Array]:
    """Places a global batch on the mesh, each array split along its batch axis."""
    rules = get_rules(rules)
    return {k: jax.device_put(v, batch_sharding(mesh, rules, np.ndim(v))) for k, v in batch.items()}


def make_sharded_train_step(model: linen.Module, tx: optax.GradientTransformation, loss_fn: LossFn,
                            mesh: Mesh, rules: str | Rules, shardings: TrainState, *, input_key: str,
                            donate: bool = False, **step_options) -> Callable:
    """``train_step(state, batch)`` as one ``jax.jit`` whose state shardings come
    from the rules (give it batches from ``shard_batch``); ``train_step.lower(state,
    batch)`` gives the lowered program (``.compile().memory_analysis()``)."""
    rules = get_rules(rules)
    step = make_train_step(model, tx, loss_fn, input_key=input_key, jit=False, **step_options)
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, replicated),
                     donate_argnums=(0,) if donate else ())
    return _in_context(jitted, mesh, rules)


def make_shard_map_train_step(model: linen.Module, tx: optax.GradientTransformation, loss_fn: LossFn,
                              mesh: Mesh, *, input_key: str, axis_name: str = "data",
                              **step_options) -> Callable:
    """Data parallelism by hand: each device takes its slice of the batch,
    gradients and metrics are ``pmean``-ed over ``axis_name``, the state is
    replicated. Same numbers as the jit path (up to reduction order)."""
    step = make_train_step(model, tx, loss_fn, input_key=input_key, axis_name=axis_name, jit=False, **step_options)
    mapped = jax.shard_map(step, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(axis_name)),
                           out_specs=(PartitionSpec(), PartitionSpec()))
    return jax.jit(mapped)


def make_pmap_train_step(model: linen.Module, tx: optax.GradientTransformation, loss_fn: LossFn, *,
                         input_key: str, axis_name: str = "data", **step_options) -> Callable:
    """The same step under ``jax.pmap``: give it a state from ``replicate`` and
    batches from ``split_for_pmap``; metrics come back per device (equal)."""
    step = make_train_step(model, tx, loss_fn, input_key=input_key, axis_name=axis_name, jit=False, **step_options)
    return jax.pmap(step, axis_name=axis_name)


def replicate(state: TrainState, num_devices: int | None = None) -> TrainState:
    """Stacks one copy of ``state`` per local device (the pmap layout)."""
    n = num_devices or jax.local_device_count()
    return jax.tree.map(lambda x: jnp.stack([x] * n), state)


def split_for_pmap(batch: Mapping[str, Any], num_devices: int | None = None) -> dict[str, np.ndarray]:
    """``[B, ...] -> [devices, B / devices, ...]``."""
    n = num_devices or jax.local_device_count()
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.shape[0] % n:
            raise ValueError(f"split_for_pmap: batch[{key!r}] has {value.shape[0]} rows, not divisible by {n} devices")
        out[key] = value.reshape(n, value.shape[0] // n, *value.shape[1:])
    return out
