"""Logical axis names -> mesh axes, and the shardings of a train state.

Parameters carry logical names through ``flax.linen.with_logical_partitioning``
(``("embed", "mlp")`` on an MLP kernel); a rules table maps each logical name
to a mesh axis, a tuple of mesh axes or ``None`` (replicated). Data, FSDP and
tensor parallelism are rules tables, not code.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as linen
import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]
# The logical axis names models annotate their parameters and activations with:
# ``layers`` is the leading axis of stacked block parameters (``GPTConfig.scan_layers``),
# ``stages`` the leading axis of the pipeline's per-stage activations.
LOGICAL_AXES = ("batch", "seq", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers", "stages")

# Every preset puts the sequence on a ``seq`` mesh axis (context parallelism:
# ring attention) and the stacked layers on a ``stage`` axis (pipeline
# parallelism); ``restrict_to_mesh`` drops them on meshes without those axes,
# so the presets below behave as before on data/fsdp/tensor meshes.
_CONTEXT_AND_PIPELINE: Rules = (("seq", "seq"), ("layers", "stage"), ("stages", "stage"))
_BATCH = (("batch", ("data", "fsdp")),)
# Data parallel: the batch over every data-like axis, parameters replicated.
DATA_PARALLEL: Rules = _BATCH + _CONTEXT_AND_PIPELINE + (
    ("embed", None), ("mlp", None), ("heads", None), ("kv_heads", None), ("head_dim", None), ("vocab", None))
# FSDP / ZeRO-3: additionally, every parameter's embed axis over fsdp; the
# optimizer state follows the parameters and gradients are reduce-scattered.
FSDP: Rules = _BATCH + _CONTEXT_AND_PIPELINE + (
    ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv_heads", None), ("head_dim", None), ("vocab", None))
# Megatron tensor parallel: column splits (mlp, heads, vocab) and row splits
# (the same names on the input side of the output projections).
TENSOR: Rules = _BATCH + _CONTEXT_AND_PIPELINE + (
    ("embed", None), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None),
    ("vocab", "tensor"))
# FSDP and tensor parallelism together (2-D sharding of every matrix).
FSDP_TENSOR: Rules = _BATCH + _CONTEXT_AND_PIPELINE + (
    ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None),
    ("vocab", "tensor"))
# The presets by the names recipes and ``get_rules`` accept.
PRESETS: dict[str, Rules] = {"data": DATA_PARALLEL, "fsdp": FSDP, "tensor": TENSOR, "fsdp_tensor": FSDP_TENSOR}


def get_rules(rules: str | Rules) -> Rules:
    """A preset by name ("data", "fsdp", "tensor", "fsdp_tensor") or the table itself."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            raise ValueError(f"get_rules: unknown preset {rules!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[rules]
    return tuple(tuple(rule) for rule in rules)


def restrict_to_mesh(rules: Rules, mesh: Mesh) -> Rules:
    """Drops mesh axes the mesh does not have (so one table serves any mesh)."""
    out = []
    for logical, target in rules:
        if target is None:
            out.append((logical, None))
            continue
        axes = tuple(a for a in ((target,) if isinstance(target, str) else target) if a in mesh.shape)
        out.append((logical, axes if len(axes) > 1 else (axes[0] if axes else None)))
    return tuple(out)


def logical_sharding(names: Sequence[str | None], mesh: Mesh, rules: str | Rules) -> NamedSharding:
    """The sharding of an array whose axes have logical ``names``."""
    spec = linen.logical_to_mesh_axes(tuple(names), restrict_to_mesh(get_rules(rules), mesh))
    return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, rules: str | Rules, rank: int = 2) -> NamedSharding:
    """Sharding of a batch array ``[batch, ...]`` (only the batch axis is split)."""
    return logical_sharding(("batch",) + (None,) * (rank - 1), mesh, rules)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """Shardings for a params tree still boxed with ``LogicallyPartitioned``
    (as ``jax.eval_shape(model.init, ...)`` returns it); unannotated leaves
    are replicated. A dimension that its mesh axes do not divide raises
    ``ValueError`` naming the parameter (e.g. 2 kv heads over tensor=4)."""
    rules = restrict_to_mesh(get_rules(rules), mesh)

    def shard(path, leaf):
        if not isinstance(leaf, linen.LogicallyPartitioned):
            return NamedSharding(mesh, PartitionSpec())
        names = tuple(leaf.names)
        spec = linen.logical_to_mesh_axes(names, rules)
        for size, name, axes in zip(leaf.value.shape, names, tuple(spec) + (None,) * len(names)):
            axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
            ways = 1
            for axis in axes:
                ways *= mesh.shape[axis]
            if size % ways:
                raise ValueError(
                    f"param_shardings: {jax.tree_util.keystr(path)} axis {name!r} has size {size}, which mesh "
                    f"axes {axes} ({ways} ways) do not divide; change the mesh or the rules")
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(shard, boxed_params,
                                            is_leaf=lambda x: isinstance(x, linen.LogicallyPartitioned))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, params_shardings: Any,
                        mesh: Mesh) -> Any:
    """Optimizer-state shardings: leaves that mirror a parameter take its
    sharding (``optax.tree_map_params``); the rest (counts) are replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx, lambda _, sharding: sharding, abstract_state, params_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding))
