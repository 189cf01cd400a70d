"""TrainState: everything a training run carries from one step to the next.

The state is plain data (a pytree): it holds no functions, so it can be
printed, ``jax.tree.map``-ed over and checkpointed as it is. The model and the
optimizer are closed over by the step functions instead (see ``step.py``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp
import optax
from flax import struct

from lepton_jax.nnx import as_model
from lepton_jax.train.loss_scale import DynamicLossScale, as_loss_scale

PyTree = Any


@struct.dataclass
class TrainState:
    """The state of one training run.

    Attributes:
      step: int32 scalar, number of optimizer steps taken.
      params: the model's ``"params"`` collection.
      opt_state: the optax optimizer state.
      model_state: the model's other mutable collections (e.g.
        ``{"batch_stats": ...}``), ``{}`` when it has none.
      rng: a raw ``uint32[2]`` PRNG key; step ``s`` draws its randomness from
        ``jax.random.fold_in(rng, s)``, so a resumed run sees the same keys as
        an uninterrupted one.
      loss_scale: a ``DynamicLossScale`` for float16 training, else ``None``.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    model_state: Mapping[str, PyTree]
    rng: jax.Array
    loss_scale: Any = None

    def __repr__(self) -> str:
        def size(tree) -> str:
            leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "size")]
            count = sum(int(x.size) for x in leaves)
            nbytes = sum(int(x.size) * x.dtype.itemsize for x in leaves)
            return f"{count:,} values in {len(leaves)} arrays ({nbytes / 1e6:.2f} MB)"

        try:
            step = int(self.step)
        except (TypeError, jax.errors.ConcretizationTypeError):  # abstract or traced
            step = self.step
        collections = ", ".join(self.model_state) or "none"
        scale = "" if self.loss_scale is None else f", loss_scale={self.loss_scale.scale}"
        return (f"TrainState(step={step}, params={size(self.params)}, opt_state={size(self.opt_state)}, "
                f"model_state=[{collections}]{scale})")

    def variables(self) -> dict[str, PyTree]:
        """The flax variables dict ``{"params": ..., **model_state}`` for ``apply``."""
        return {"params": self.params, **self.model_state}


def create_train_state(
    model: linen.Module,
    tx: optax.GradientTransformation,
    example_inputs: jax.Array,
    *,
    seed: int = 0,
    loss_scale: Any = None,
) -> TrainState:
    """Initialises a model and its optimizer into a ``TrainState``.

    Args:
      model: a linen module whose ``__call__(x, *, train: bool)`` takes a batch,
        or an ``nnx.Module`` (its own parameters; see ``lepton_jax.nnx``).
      tx: the optax transformation used for training.
      example_inputs: a batch (any batch size) with the shape and dtype of the
        real inputs; only its shape and dtype are used.
      seed: the run's seed; the params init key and the step keys derive from it.
      loss_scale: ``None``, ``"dynamic"`` (a default ``DynamicLossScale``) or a
        ``DynamicLossScale``; the step then scales the loss and skips steps
        with non-finite gradients (float16 training).

    Returns:
      A ``TrainState`` at step 0.
    """
    if not isinstance(seed, int):
        raise TypeError(f"create_train_state: seed must be an int, got {type(seed).__name__}")
    model = as_model(model)  # an nnx.Module works too (lepton_jax.nnx)
    scale = as_loss_scale(loss_scale)
    # One compiled program: run eagerly, every initializer and every op of the
    # init forward pass would compile on its own (about twice the time for a
    # small CNN or GPT on CPU). Under an outer jit (sharded init) it inlines.
    return jax.jit(_initializer(model, tx, example_inputs, seed))(scale)


def _initializer(model: linen.Module, tx: optax.GradientTransformation, example_inputs: jax.Array, seed: Any):
    # Shapes only: initialisation must not depend on the example's values.
    shape, dtype = jnp.shape(example_inputs), jnp.asarray(example_inputs).dtype

    def init(scale: DynamicLossScale | None, seed: Any = seed) -> TrainState:
        init_key, dropout_key, run_key = jax.random.split(jax.random.PRNGKey(seed), 3)
        variables = model.init({"params": init_key, "dropout": dropout_key}, jnp.zeros(shape, dtype), train=False)
        # Logical-axis boxes (with_logical_partitioning) describe sharding; the
        # state holds plain arrays.
        variables = dict(linen.meta.unbox(variables))
        params = variables.pop("params")
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          model_state=variables, rng=run_key, loss_scale=scale)

    return init


def create_population_state(model: linen.Module, tx: optax.GradientTransformation, example_inputs: jax.Array,
                            seeds: Sequence[int]) -> TrainState:
    """``len(seeds)`` train states stacked on a leading axis: member ``k``
    is ``create_train_state(..., seed=seeds[k])``, for a ``vmap``-ed step
    that trains them as one program (e.g. a population of tuning trials)."""
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise TypeError(f"create_population_state: seeds must be a non-empty list of ints, got {seeds!r}")
    init = _initializer(model, tx, example_inputs, None)
    return jax.jit(jax.vmap(lambda seed: init(None, seed)))(jnp.asarray(seeds, jnp.int32))


def count_params(params: PyTree) -> int:
    """Total number of scalar parameters in a pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
