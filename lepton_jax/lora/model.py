"""A LoRA fine-tune of any linen model, driven by ``lepton_jax.train``'s steps.

The trainable ``"params"`` are the adapters alone; the frozen base lives in
its own variables collection ``"base"`` (float32, bfloat16 or int8 storage):

    lora = LoRA(model, LoRAConfig(pattern=r"attention/(query|value)"))
    tx = optax.adamw(1e-3)
    state = create_train_state(lora, params, tx, base_dtype="int8",
                               logical_axes=parallel.param_logical_axes(model, tokens))
    step = train.make_train_step(lora, tx, models.lm_loss, input_key="inputs", donate=True)
    merged = merge(state.model_state["base"], state.params, lora.config)  # for export or generate

Why the base is not in ``"params"``: ``jax.grad`` refuses int8 inputs, and a
base there would get a gradient buffer and optimizer slots for nothing. As a
collection of ``TrainState.model_state`` it is passed to the model, never
differentiated, returned unchanged by each step and checkpointed with the
state. Pass ``donate=True`` to ``make_train_step`` so the step's copy of the
base reuses the old buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp
import optax

from lepton_jax.lora.adapters import LoRAConfig, freeze, init, merge
from lepton_jax.train.state import TrainState

PyTree = Any
BASE_COLLECTION = "base"
# Folded into the step's "dropout" key: the adapters' masks stay apart from
# the streams linen derives for the model's own dropout layers.
_ADAPTER_DROPOUT_STREAM = 0x4C6F5241


@dataclasses.dataclass(frozen=True)
class LoRA:
    """``model`` with low-rank adapters on the weights ``config`` selects.

    Used where lepton_jax takes a linen model in training
    (``make_train_step``, ``make_eval_step``): ``apply`` takes
    ``{"params": adapters, "base": frozen_params, **other_collections}``.
    """

    model: linen.Module
    config: LoRAConfig

    def apply(self, variables: Mapping[str, PyTree], *args: Any, rngs: Mapping[str, jax.Array] | None = None,
              mutable: bool | str | Sequence[str] = False, **kwargs: Any) -> Any:
        """``model.apply`` on the base with the adapters merged in (``merge``).

        No gradient reaches the base (``stop_gradient``). With
        ``config.dropout > 0`` and ``train=True`` the adapters' dropout key
        comes from ``rngs["dropout"]``. ``mutable`` as in linen; when it
        names ``"base"`` (``make_train_step`` passes every collection of
        ``model_state``) the base is returned unchanged among the updates.
        """
        if not isinstance(variables, Mapping) or not {"params", BASE_COLLECTION} <= set(variables):
            got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
            raise ValueError(f"LoRA.apply: variables must hold 'params' (the adapters) and "
                             f"{BASE_COLLECTION!r} (the frozen base), got {got}")
        base = variables[BASE_COLLECTION]
        others = {k: v for k, v in variables.items() if k not in ("params", BASE_COLLECTION)}
        merged = merge(jax.lax.stop_gradient(base), variables["params"], self.config,
                       dropout_key=self._dropout_key(rngs, kwargs.get("train", False)))
        inner = _without_base(mutable)
        out = self.model.apply({"params": merged, **others}, *args, rngs=rngs, mutable=inner, **kwargs)
        if mutable is False:
            return out
        outputs, updates = out if inner is not False else (out, {})
        updates = dict(updates)
        if mutable is True or BASE_COLLECTION in _as_names(mutable):
            updates[BASE_COLLECTION] = base
        return outputs, updates

    def _dropout_key(self, rngs: Mapping[str, jax.Array] | None, train: Any) -> jax.Array | None:
        if self.config.dropout == 0 or not train:
            return None
        if not rngs or "dropout" not in rngs:
            raise ValueError(f"LoRA.apply: dropout {self.config.dropout} with train=True needs "
                             f"rngs={{'dropout': key}}, got rngs {None if rngs is None else sorted(rngs)}")
        return jax.random.fold_in(rngs["dropout"], _ADAPTER_DROPOUT_STREAM)


def create_train_state(lora: LoRA, base_params: PyTree, tx: optax.GradientTransformation, *, seed: int = 0,
                       logical_axes: PyTree | None = None, base_dtype: str = "float32",
                       model_state: Mapping[str, PyTree] | None = None) -> TrainState:
    """A ``TrainState`` at step 0 for training ``lora``'s adapters.

    ``params``: fresh adapters (``init``; ``logical_axes`` as there),
    ``opt_state``: ``tx.init`` of the adapters only, ``model_state``:
    ``{"base": freeze(base_params, base_dtype), **model_state}`` (e.g. the
    base model's ``batch_stats``). ``seed`` derives the adapters' init key and
    the run's step keys, as in ``train.create_train_state``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"lora.create_train_state: seed must be an int, got {type(seed).__name__}")
    model_state = dict(model_state or {})
    if BASE_COLLECTION in model_state or "params" in model_state:
        raise ValueError(f"lora.create_train_state: model_state must not hold 'params' or {BASE_COLLECTION!r} "
                         f"(they are the adapters and the base), got {sorted(model_state)}")
    base_params = linen.meta.unbox(base_params)

    def build(base_params: PyTree, model_state: dict[str, PyTree]) -> TrainState:
        init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
        adapters = init(init_key, base_params, lora.config, logical_axes=logical_axes)
        return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=tx.init(adapters),
                          model_state={BASE_COLLECTION: freeze(base_params, base_dtype), **model_state},
                          rng=run_key)

    # One compiled program instead of one per op and leaf shape (quantization, init).
    return jax.jit(build)(base_params, model_state)


def _without_base(mutable: Any) -> bool | list[str]:
    """``mutable`` for the inner model: ``"base"`` is this wrapper's, not the model's."""
    if isinstance(mutable, bool):
        return mutable
    names = [name for name in _as_names(mutable) if name != BASE_COLLECTION]
    return names or False


def _as_names(mutable: Any) -> list[str]:
    if isinstance(mutable, str):
        return [mutable]
    if isinstance(mutable, (list, tuple)) and all(isinstance(name, str) for name in mutable):
        return list(mutable)
    raise TypeError(f"LoRA.apply: mutable must be a bool, a collection name or a list of names, got {mutable!r}")
