"""Post-training quantization of linen models with qwix.

qwix intercepts the matmuls and convolutions (``dot_general``, ``einsum``,
``conv_general_dilated``) that a module's parameters feed, so lepton_jax's
``nn.Dense``, ``nn.Conv`` and the GPT's projections are quantized without
changes to the model code. Modes:

- ``"int8"``: weights and activations int8, per-channel weight scales and
  static activation scales from ``calibration`` batches (absmax);
- ``"int8_weight"``: weights int8, activations in float, for matmuls. qwix
  quantizes a convolution only with both operands int8, so convolutions get
  int8 activations with a dynamic (per-batch) scale in this mode.

``quantize`` returns a ``QuantizedModel``: apply it like the original, or
hand ``export_parts()`` to ``lepton_jax.export.export_model`` (the weights
are stored as int8 plus scales, about 4x smaller than float32).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import linen

from lepton_jax._pytree import path_str

MODES = ("int8", "int8_weight")


class QuantizedModel(NamedTuple):
    """A qwix-quantized module and its variables (int8 weights with scales)."""

    model: linen.Module
    variables: dict[str, Any]
    apply_kwargs: dict[str, Any]

    def apply(self, *inputs: Any) -> Any:
        """The quantized model's outputs for ``inputs``."""
        return self.model.apply(self.variables, *inputs, **self.apply_kwargs)

    def export_parts(self) -> tuple[Callable[..., Any], dict[str, jax.Array]]:
        """``(apply_fn, flat_params)`` for ``export_model``: the params are a
        flat ``{path: array}`` dict (int8 values and float scales), rebuilt
        into qwix's structure inside the exported function, so loading the
        export needs neither qwix nor flax."""
        flat, rebuild = self.flat_variables()
        model, kwargs = self.model, self.apply_kwargs

        def apply_fn(flat_params, *inputs):
            return model.apply(rebuild(flat_params), *inputs, **kwargs)

        return apply_fn, flat

    def flat_variables(self) -> tuple[dict[str, jax.Array], Callable[[dict[str, Any]], Any]]:
        """``(flat, rebuild)``: the variables as a flat ``{path: array}`` dict,
        and the function that turns such a dict back into the tree
        ``self.model.apply`` takes."""
        leaves, treedef = jax.tree_util.tree_flatten_with_path(self.variables)
        paths = [path_str(p) for p, _ in leaves]

        def rebuild(flat: dict[str, Any]) -> Any:
            return jax.tree_util.tree_unflatten(treedef, [flat[p] for p in paths])

        return {path: leaf for path, (_, leaf) in zip(paths, leaves)}, rebuild


def _rules(mode: str, module_path: str, act_batch_axes: Sequence[int] = (0,)) -> list:
    import qwix

    if mode == "int8":
        return [qwix.QuantizationRule(module_path=module_path, weight_qtype="int8", act_qtype="int8",
                                      act_static_scale=True, act_calibration_method="absmax",
                                      act_batch_axes=tuple(act_batch_axes))]
    return [qwix.QuantizationRule(module_path=module_path, op_names=("conv_general_dilated",), weight_qtype="int8",
                                  act_qtype="int8"),
            qwix.QuantizationRule(module_path=module_path, weight_qtype="int8")]


def qat(model: linen.Module, *, mode: str = "int8", module_path: str = ".*") -> linen.Module:
    """``model`` with quantization in the loop, for quantization-aware training.

    The returned module rounds weights (and with ``"int8"`` activations) to
    int8 in the forward pass and passes gradients straight through; its
    activation statistics live in the ``"quant_stats"`` collection, which
    ``create_train_state`` keeps in ``model_state`` and the train step
    updates. Train it like ``model``, then ``quantize`` the trained variables.
    """
    import qwix

    if mode not in MODES:
        raise ValueError(f"qat: mode must be one of {MODES}, got {mode!r}")
    return qwix.quantize_model(model, qwix.QtProvider(_rules(mode, module_path)))


def quantize(model: linen.Module, variables: dict[str, Any], example_inputs: jax.Array, *, mode: str = "int8",
             calibration: Iterable[jax.Array] | None = None, module_path: str = ".*",
             act_batch_axes: Sequence[int] = (0,), apply_kwargs: dict[str, Any] | None = None) -> QuantizedModel:
    """Quantizes ``model`` with trained ``variables`` (``{"params": ..., ...}``).

    Args:
      example_inputs: a batch with the real inputs' shapes and dtypes.
      mode: ``"int8"`` (weights and activations; needs ``calibration``) or
        ``"int8_weight"``.
      calibration: a few input batches (e.g. training data) whose activation
        ranges set the static scales.
      module_path: a regex of the module paths to quantize (default: all),
        matched against the whole path (``re.fullmatch``).
      act_batch_axes: with ``"int8"``, the activation axes whose size may
        change between calls; one static scale is shared along them (for
        ``[batch, seq, ...]`` activations of a language model: ``(0, 1)``).
      apply_kwargs: extra ``model.apply`` arguments (default ``{"train": False}``).
    """
    import qwix

    if mode not in MODES:
        raise ValueError(f"quantize: mode must be one of {MODES}, got {mode!r}")
    axes = tuple(act_batch_axes)
    if not axes or any(not isinstance(a, int) or a < 0 for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"quantize: act_batch_axes must be distinct non-negative ints such as (0,) or (0, 1), "
                         f"got {act_batch_axes!r}")
    kwargs = {"train": False} if apply_kwargs is None else dict(apply_kwargs)
    variables = dict(linen.meta.unbox(variables))
    rules = _rules(mode, module_path, axes)
    stats: Any = {}
    if mode == "int8":
        batches = [] if calibration is None else list(calibration)
        if not batches:
            raise ValueError("quantize: mode='int8' sets activation scales from calibration batches; give some")
        calibrating = qwix.quantize_model(model, qwix.QtProvider(rules))

        def observe(stats, batch):
            _, updates = calibrating.apply({**variables, "quant_stats": stats}, batch, mutable=["quant_stats"],
                                           **kwargs)
            return updates["quant_stats"]

        # The statistics start empty (qwix's moving average: zero count and
        # sums); only their structure is needed, so the init is abstract
        # rather than an eager run of every initializer and op.
        shapes = jax.eval_shape(lambda: calibrating.init(jax.random.PRNGKey(0), batches[0], **kwargs))
        stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes).get("quant_stats", {}))
        stats = _calibrate(observe, stats, batches)
    quantized = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(lambda: quantized.init(jax.random.PRNGKey(0), example_inputs, **kwargs))
    params = qwix.quantize_params(variables["params"], abstract["params"], stats)
    others = {k: v for k, v in variables.items() if k != "params"}
    return QuantizedModel(quantized, {**others, "params": params}, kwargs)


def _calibrate(observe: Callable[[Any, Any], Any], stats: Any, batches: list) -> Any:
    """Folds ``observe`` over the calibration batches: compiled once when it
    can be, else eagerly. qwix 0.1.8 updates a convolution's statistics inside
    a ``custom_vjp``, which leaks a tracer under ``jit``; such models (the
    CNNs) calibrate op by op, the others (transformers) in one program."""
    try:
        compiled = jax.jit(observe)
        observed = compiled(stats, batches[0])
    except jax.errors.UnexpectedTracerError:
        compiled, observed = observe, observe(stats, batches[0])
    for batch in batches[1:]:
        observed = compiled(observed, batch)
    return observed

