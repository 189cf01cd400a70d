"""Magnitude pruning as an optax transformation.

Chain it after the optimizer: ``optax.chain(optax.adam(1e-3),
magnitude_prune(polynomial_sparsity(0.9, 100, 1000)))``. Its state carries
one mask per parameter. On mask-update steps the masks are recomputed from
the magnitudes of the parameters *after* this step's update (``|params +
updates|``): the smallest ``sparsity(step)`` fraction is pruned, over all
prunable parameters together (``scope="global"``) or per parameter
(``"per_layer"``). ``structure="2:4"`` (N:M in general) instead keeps the N
largest of every M consecutive weights along the input axis, once the
schedule's sparsity is above zero. The returned updates make every masked
parameter exactly zero (``updates = where(mask, updates, -params)``), so the
pruned weights stay zero whatever the optimizer does.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lepton_jax._pytree import path_str

PyTree = Any


def polynomial_sparsity(target: float, begin_step: int, end_step: int, *, initial: float = 0.0, power: float = 3.0,
                        frequency: int = 1) -> Callable[[jax.Array], jax.Array]:
    """The gradual schedule of Zhu & Gupta (2017): ``s(t) = target + (initial -
    target) * (1 - (t - begin) / (end - begin)) ** power`` between the steps,
    ``initial`` before and ``target`` after. The returned function also has
    ``frequency`` (steps between mask updates) and ``begin_step`` attributes.
    """
    if not 0.0 <= initial <= target < 1.0:
        raise ValueError(f"polynomial_sparsity: need 0 <= initial <= target < 1, got initial={initial}, "
                         f"target={target}")
    if not 0 <= begin_step < end_step:
        raise ValueError(f"polynomial_sparsity: need 0 <= begin_step < end_step, got {begin_step}, {end_step}")
    if frequency < 1:
        raise ValueError(f"polynomial_sparsity: frequency must be >= 1, got {frequency}")

    def schedule(step: jax.Array) -> jax.Array:
        progress = jnp.clip((jnp.asarray(step, jnp.float32) - begin_step) / (end_step - begin_step), 0.0, 1.0)
        return target + (initial - target) * (1.0 - progress) ** power

    schedule.frequency = frequency
    schedule.begin_step = begin_step
    return schedule


class MagnitudePruneState(NamedTuple):
    """``count``: updates seen; ``masks``: bool per parameter (True: kept)."""

    count: jax.Array
    masks: PyTree


def default_prunable(params: PyTree) -> PyTree:
    """True for weight matrices and kernels (``ndim >= 2``), False for biases and norms."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def magnitude_prune(schedule: Callable[[jax.Array], jax.Array], *, scope: str = "global",
                    structure: str = "unstructured", mask_fn: Callable[[PyTree], PyTree] | None = None
                    ) -> optax.GradientTransformation:
    """Prunes parameters by magnitude on ``schedule`` (see the module docstring).

    Args:
      schedule: ``step -> sparsity`` (e.g. ``polynomial_sparsity``); its
        ``frequency`` attribute (default 1) spaces the mask updates.
      scope: ``"global"`` (one threshold) or ``"per_layer"``.
      structure: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"``.
      mask_fn: ``params -> pytree of bool``: which leaves may be pruned
        (default ``default_prunable``: ``ndim >= 2``).
    """
    if scope not in ("global", "per_layer"):
        raise ValueError(f"magnitude_prune: scope must be 'global' or 'per_layer', got {scope!r}")
    n_m = None
    if structure != "unstructured":
        try:
            n_m = tuple(int(v) for v in structure.split(":"))
            assert len(n_m) == 2 and 0 < n_m[0] < n_m[1]
        except (ValueError, AssertionError):
            raise ValueError(f"magnitude_prune: structure must be 'unstructured' or 'N:M' with 0 < N < M, "
                             f"got {structure!r}") from None
    frequency = int(getattr(schedule, "frequency", 1))
    prunable_fn = mask_fn or default_prunable

    def init(params: PyTree) -> MagnitudePruneState:
        if n_m is not None:
            _check_groups(params, prunable_fn(params), n_m[1])
        return MagnitudePruneState(jnp.zeros((), jnp.int32), jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool),
                                                                          params))

    def update(updates: PyTree, state: MagnitudePruneState, params: PyTree | None = None):
        if params is None:
            raise ValueError("magnitude_prune: the update needs params (call tx.update(grads, state, params))")
        prunable = prunable_fn(params)

        def fresh_masks() -> PyTree:
            sparsity = schedule(state.count)
            candidate = jax.tree.map(lambda p, u: p + u, params, updates)
            if n_m is not None:
                return _n_m_masks(candidate, prunable, *n_m, active=sparsity > 0)
            if scope == "global":
                return _global_masks(candidate, state.masks, prunable, sparsity)
            return jax.tree.map(lambda p, m, keep: _leaf_mask(p, m, sparsity) if keep else m, candidate,
                                state.masks, prunable)

        # The ranking (a sort of every prunable weight) runs on mask-update
        # steps only: computed every step and discarded, it made a pruned MLP's
        # step four times slower than the dense one on CPU.
        masks = jax.lax.cond(state.count % frequency == 0, fresh_masks, lambda: state.masks)
        updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
        return updates, MagnitudePruneState(state.count + 1, masks)

    return optax.GradientTransformation(init, update)


def _magnitudes(p: jax.Array, mask: jax.Array) -> jax.Array:
    # Pruned weights rank below every kept one, so a mask never revives them.
    return jnp.where(mask, jnp.abs(p.astype(jnp.float32)), -1.0)


def _keep_largest(scores: jax.Array, sparsity: jax.Array) -> jax.Array:
    """True for all but the ``floor(sparsity * n)`` smallest of a flat array."""
    prune = jnp.floor(sparsity * scores.size).astype(jnp.int32)
    order = jnp.argsort(scores, stable=True)
    ranks = jnp.zeros_like(order).at[order].set(jnp.arange(scores.size, dtype=order.dtype))  # the inverse permutation
    return ranks >= prune


def _leaf_mask(p: jax.Array, mask: jax.Array, sparsity: jax.Array) -> jax.Array:
    return _keep_largest(_magnitudes(p, mask).reshape(-1), sparsity).reshape(p.shape)


def _global_masks(params: PyTree, masks: PyTree, prunable: PyTree, sparsity: jax.Array) -> PyTree:
    leaves, treedef = jax.tree.flatten(params)
    mask_leaves, keep = jax.tree.leaves(masks), jax.tree.leaves(prunable)
    chosen = [i for i, k in enumerate(keep) if k]
    if not chosen:
        return masks
    scores = jnp.concatenate([_magnitudes(leaves[i], mask_leaves[i]).reshape(-1) for i in chosen])
    flat = _keep_largest(scores, sparsity)
    out, start = list(mask_leaves), 0
    for i in chosen:
        size = leaves[i].size
        out[i] = flat[start:start + size].reshape(leaves[i].shape)
        start += size
    return jax.tree.unflatten(treedef, out)


def _group_axis(p: jax.Array) -> int:
    return p.ndim - 2  # the input axis: Dense [in, out], Conv [..., in, out]


def _check_groups(params: PyTree, prunable: PyTree, m: int) -> None:
    for (path, p), keep in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(prunable)):
        if keep and p.shape[_group_axis(p)] % m:
            raise ValueError(f"magnitude_prune: {path_str(path)!r} has shape {tuple(p.shape)}; its input axis "
                             f"{_group_axis(p)} ({p.shape[_group_axis(p)]}) must be a multiple of M={m} for N:M pruning")


def _n_m_masks(params: PyTree, prunable: PyTree, n: int, m: int, active: jax.Array) -> PyTree:
    def leaf(p, keep):
        if not keep:
            return jnp.ones(p.shape, bool)
        axis = _group_axis(p)
        moved = jnp.moveaxis(jnp.abs(p.astype(jnp.float32)), axis, -1)
        groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
        ranks = jnp.argsort(jnp.argsort(groups, axis=-1, stable=True), axis=-1, stable=True)
        kept = (ranks >= m - n).reshape(moved.shape)
        return jnp.where(active, jnp.moveaxis(kept, -1, axis), True)

    return jax.tree.map(leaf, params, prunable)


def sparsity(params: PyTree) -> dict[str, float]:
    """The fraction of exact zeros in each array, by '/'-joined path."""
    return {path_str(path): float(jnp.mean(leaf == 0)) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def apply_masks(params: PyTree, state: Any) -> PyTree:
    """``params`` with the masks of the ``MagnitudePruneState`` found in an
    optimizer state (e.g. a chain's) applied."""
    found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, MagnitudePruneState))
             if isinstance(s, MagnitudePruneState)]
    if not found:
        raise ValueError("apply_masks: the optimizer state holds no MagnitudePruneState")
    return jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, found[0].masks)
