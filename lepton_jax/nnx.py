"""Flax NNX models through lepton_jax's pure ``init``/``apply`` machinery.

``NNXModel.wrap(module)`` splits an ``nnx.Module`` (``nnx.split``) into its
graph definition and state, and behaves like a linen module where
lepton_jax takes one (``train.create_train_state``, ``make_train_step``,
``make_eval_step``, ``fit``, ``export``): ``init`` returns the module's own
variables as linen-style collections (``nnx.Param`` -> ``"params"``,
``nnx.BatchStat`` -> ``"batch_stats"``, any other variable type under its
lower-cased name), and ``apply(variables, *inputs, train=, rngs=, mutable=)``
merges them back (``nnx.merge``), sets training or evaluation mode, reseeds
the ``dropout`` stream from ``rngs`` and calls the module. Those functions
also accept the ``nnx.Module`` itself (``as_model``).

The parameters are the ones the module was built with (its own ``nnx.Rngs``):
``create_train_state``'s seed then only drives the steps' randomness.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

PARAMS, BATCH_STATS = "params", "batch_stats"


def _nnx():
    from flax import nnx

    return nnx


def _collection(variable_type: type) -> str:
    nnx = _nnx()
    if issubclass(variable_type, nnx.Param):
        return PARAMS
    if issubclass(variable_type, nnx.BatchStat):
        return BATCH_STATS
    return variable_type.__name__.lower()


@dataclasses.dataclass(frozen=True, eq=False)
class NNXModel:
    """An ``nnx.Module`` seen as ``init``/``apply`` (see the module docstring)."""

    graphdef: Any
    state: Any  # the module's whole state when wrapped: the template apply fills

    @classmethod
    def wrap(cls, module: Any) -> "NNXModel":
        nnx = _nnx()
        if not isinstance(module, nnx.Module):
            raise TypeError(f"NNXModel.wrap: expected an nnx.Module, got {type(module).__name__}")
        graphdef, state = nnx.split(module)
        return cls(graphdef, state)

    def _split(self, state: Any, *, boxed: bool = False) -> dict[str, Any]:
        """The state's variables by collection (RNG streams stay with the template);
        ``boxed``: parameters with sharding names (``nnx.with_partitioning``)
        as linen ``LogicallyPartitioned`` boxes, which lepton_jax's rules read."""
        nnx = _nnx()
        from flax import linen

        collections: dict[str, dict] = {}
        for path, variable in nnx.to_flat_state(state):
            if isinstance(variable, nnx.RngState):
                continue
            value = variable.get_value()
            metadata = variable.get_metadata()
            names = metadata.get("out_sharding") or metadata.get("sharding_names") or metadata.get("sharding")
            if boxed and names is not None:
                value = linen.LogicallyPartitioned(value, tuple(names))
            collections.setdefault(_collection(type(variable)), {})[tuple(str(p) for p in path)] = value
        from flax import traverse_util

        return {name: traverse_util.unflatten_dict(flat) for name, flat in collections.items()}

    def init(self, rngs: Any = None, *inputs: Any, **kwargs: Any) -> dict[str, Any]:
        """The module's variables by collection (``rngs`` and ``inputs`` are not
        used); parameters with sharding names are boxed (see ``_split``)."""
        del rngs, inputs, kwargs
        return self._split(self.state, boxed=True)

    def apply(self, variables: dict[str, Any], *inputs: Any, train: bool = False, rngs: dict | None = None,
              mutable: bool | str | Sequence[str] = False, **kwargs: Any) -> Any:
        """``module(*inputs, **kwargs)`` with ``variables``; with ``mutable``,
        ``(outputs, updated collections)`` as linen returns them."""
        nnx = _nnx()
        from flax import traverse_util

        given = {(name, *path): value for name, tree in variables.items()
                 for path, value in traverse_util.flatten_dict(tree).items()}
        flat = []
        for path, variable in nnx.to_flat_state(self.state):
            key = (_collection(type(variable)), *(str(p) for p in path))
            value = variable.get_value()
            if not isinstance(variable, nnx.RngState) and key[0] in variables:
                if key not in given:
                    raise ValueError(f"NNXModel.apply: variables lack {'/'.join(key)}")
                value = given[key]
            # New Variable objects every call: a traced apply may mutate them (dropout counts, statistics).
            flat.append((path, variable.replace(value)))
        module = nnx.merge(self.graphdef, nnx.from_flat_state(flat))
        module.train() if train else module.eval()
        if rngs is not None and "dropout" in rngs:
            nnx.reseed(module, dropout=rngs["dropout"])
        outputs = module(*inputs, **kwargs)
        if mutable is False:
            return outputs
        updated = self._split(nnx.state(module))
        names = list(updated) if mutable is True else [mutable] if isinstance(mutable, str) else list(mutable)
        return outputs, {name: updated[name] for name in names if name in updated}


def as_model(model: Any) -> Any:
    """``model`` itself, or an ``NNXModel`` for an ``nnx.Module``."""
    return NNXModel.wrap(model) if isinstance(model, _nnx().Module) else model


__all__ = ["NNXModel", "as_model"]
