"""Pure train and eval steps built from a model, an optimizer and a loss.

``make_train_step`` returns ``train_step(state, batch) -> (state, metrics)``;
``make_eval_step`` returns ``eval_step(state, batch) -> stats`` where ``stats``
are additive sums, so evaluation over many (padded) batches is exact.

Conventions a model follows to plug in: ``model.apply(variables, inputs,
train=bool)``; randomness comes from the ``"dropout"`` RNG stream; mutable
collections (e.g. ``batch_stats``) live in ``TrainState.model_state``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lepton_jax.nnx import as_model
from lepton_jax.ops import losses, metrics as metrics_lib
from lepton_jax.train import loss_scale
from lepton_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
LossOutput = jax.Array | tuple[jax.Array, Mapping[str, jax.Array]]
# (model outputs, batch) -> scalar loss, or (scalar loss, {name: scalar}).
LossFn = Callable[[Any, Batch], LossOutput]
# (key, inputs) -> augmented inputs, same shape and dtype.
AugmentFn = Callable[[jax.Array, jax.Array], jax.Array]


def classification_loss(
    *, label_key: str = "label", label_smoothing: float = 0.0
) -> LossFn:
    """Softmax cross-entropy on integer labels, honouring ``batch["mask"]``.

    Returns a ``LossFn`` giving ``(mean loss, {"accuracy": ...})`` over the
    examples whose mask is True (all of them when the batch has no mask).
    """

    def loss_fn(logits_BxC: jax.Array, batch: Batch) -> LossOutput:
        labels_B = _get(batch, label_key, "classification_loss")
        mask_B = batch.get("mask")
        loss = losses.softmax_cross_entropy(
            logits_BxC, labels_B, label_smoothing=label_smoothing, mask=mask_B
        )
        return loss, {"accuracy": metrics_lib.accuracy(logits_BxC, labels_B, mask=mask_B)}

    return loss_fn


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    *,
    input_key: str,
    model_inputs: Sequence[str] = (),
    regularizer: Callable[[Any], jax.Array] | None = None,
    augment_fn: AugmentFn | None = None,
    axis_name: str | None = None,
    jit: bool = True,
    donate: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds ``train_step(state, batch) -> (state, metrics)``.

    Args:
      model: linen module called as ``model.apply(variables, x, train=True)``.
      tx: optax transformation (the one ``state.opt_state`` was made with).
      loss_fn: ``(outputs, batch) -> loss`` or ``(loss, aux_metrics)``.
      input_key: the batch entry fed to the model.
      model_inputs: batch entries also passed to the model by keyword (e.g.
        ``("segment_ids",)`` for packed sequences).
      regularizer: optional ``params -> scalar`` added to the loss (e.g.
        ``lambda p: 1e-4 * ops.l2_penalty(p)``); reported as ``"penalty"``.
      augment_fn: optional ``(key, inputs) -> inputs`` applied before the model;
        ``loss_fn`` receives the batch with the augmented inputs.
      axis_name: inside ``shard_map``/``pmap`` over this data axis, gradients
        and metrics are averaged across it (``lax.pmean``).
      jit: wrap the step in ``jax.jit``.
      donate: donate the incoming state's buffers (saves memory; the caller
        must not reuse the old state).

    With ``state.loss_scale`` set (float16 training, see ``DynamicLossScale``)
    the loss is scaled before differentiation, steps with non-finite
    gradients are skipped, and ``loss_scale``/``skipped_step`` are reported.

    The step's randomness is ``fold_in(state.rng, state.step)``: bitwise
    reproducible for a seed, and identical after a resume.
    Metrics: ``loss`` (without the penalty), ``grad_norm``, ``penalty`` (with
    a regularizer) and the loss's aux metrics.
    """
    model = as_model(model)  # an nnx.Module works too (lepton_jax.nnx)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        inputs = _get(batch, input_key, "train_step")
        extra = {key: _get(batch, key, "train_step") for key in model_inputs}
        step_key = jax.random.fold_in(state.rng, state.step)
        augment_key, dropout_key = jax.random.split(step_key)
        if augment_fn is not None:
            inputs = augment_fn(augment_key, inputs)
            if isinstance(batch, Mapping):  # the loss sees the inputs the model saw (e.g. a teacher)
                batch = {**batch, input_key: inputs}
        mutable = list(state.model_state.keys())

        def objective(params):
            variables = {"params": params, **state.model_state}
            outputs, new_model_state = _apply(
                model, variables, inputs, train=True, rngs={"dropout": dropout_key}, mutable=mutable, **extra
            )
            loss, aux = _split_loss(loss_fn(outputs, batch))
            penalty = regularizer(params) if regularizer is not None else jnp.zeros((), loss.dtype)
            total = loss + penalty
            if scaler is not None:
                total = scaler.scale_loss(total)
            return total, (loss, penalty, aux, new_model_state)

        scaler = state.loss_scale
        grads, (loss, penalty, aux, new_model_state) = jax.grad(objective, has_aux=True)(state.params)
        if scaler is not None:
            grads = scaler.unscale(grads)
        if axis_name is not None:
            grads, loss, penalty, aux = jax.lax.pmean((grads, loss, penalty, aux), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, model_state=new_model_state
        )
        out = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        if scaler is not None:
            # A step with inf/nan gradients changes nothing but the step count
            # and the scale (the data stream moves on, as in a normal step).
            finite = loss_scale.all_finite(grads)
            kept = (state.params, state.opt_state, state.model_state)
            params, opt_state, model_state = optax.tree.where(finite, (params, opt_state, new_model_state), kept)
            new_state = new_state.replace(params=params, opt_state=opt_state, model_state=model_state,
                                          loss_scale=scaler.adjust(finite))
            out["loss_scale"] = scaler.scale
            out["skipped_step"] = 1.0 - finite.astype(jnp.float32)
        if regularizer is not None:
            out["penalty"] = penalty
        return new_state, out

    if jit:
        return jax.jit(train_step, donate_argnums=(0,) if donate else ())
    return train_step


def make_eval_step(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    input_key: str,
    model_inputs: Sequence[str] = (),
    label_key: str = "label",
    num_classes: int | None = None,
    top_k: Sequence[int] = (1,),
    jit: bool = True,
) -> Callable[[TrainState, Batch], dict[str, Any]]:
    """Builds ``eval_step(state, batch) -> stats`` of additive sums.

    ``model_inputs``: batch entries also passed to the model by keyword (as in ``make_train_step``).

    ``stats`` holds ``loss_sum`` and ``num_examples`` (examples whose
    ``batch["mask"]`` is True), and with ``num_classes`` the classification
    counts of ``ops.classification_counts`` under ``"classification"``.
    Accumulate with ``merge_stats`` and finish with ``finalize_stats``.
    """
    model = as_model(model)  # an nnx.Module works too (lepton_jax.nnx)

    def eval_step(state: TrainState, batch: Batch) -> dict[str, Any]:
        inputs = _get(batch, input_key, "eval_step")
        extra = {key: _get(batch, key, "eval_step") for key in model_inputs}
        outputs = model.apply(state.variables(), inputs, train=False, **extra)
        mask_B = batch.get("mask")
        if mask_B is None:
            mask_B = jnp.ones(inputs.shape[:1], bool)
        loss, _ = _split_loss(loss_fn(outputs, batch))
        num = jnp.sum(mask_B.astype(jnp.float32))
        stats: dict[str, Any] = {"loss_sum": loss.astype(jnp.float32) * num, "num_examples": num}
        if num_classes is not None:
            stats["classification"] = metrics_lib.classification_counts(
                outputs, _get(batch, label_key, "eval_step"), num_classes=num_classes,
                mask=mask_B, top_k=tuple(top_k),
            )
        return stats

    return jax.jit(eval_step) if jit else eval_step


def merge_stats(total: dict[str, Any] | None, stats: dict[str, Any]) -> dict[str, Any]:
    """Adds one batch's eval stats to a running total (``None`` starts one)."""
    if total is None:
        return stats
    return jax.tree.map(jnp.add, total, stats)


def finalize_stats(total: dict[str, Any]) -> dict[str, Any]:
    """Turns accumulated eval stats into metrics: ``loss`` and, when present,
    accuracy, top-k, per-class and macro precision/recall/F1 and the confusion
    matrix (as numpy arrays / Python floats)."""
    count = float(total["num_examples"])
    result: dict[str, Any] = {"loss": float(total["loss_sum"]) / max(count, 1.0), "num_examples": int(count)}
    if "classification" in total:
        computed = metrics_lib.compute_classification_metrics(total["classification"])
        result.update({k: jax.device_get(v) for k, v in computed.items()})
        result["confusion"] = jax.device_get(total["classification"]["confusion"])
    return {k: (float(v) if getattr(v, "ndim", None) == 0 else v) for k, v in result.items()}


def evaluate(state: TrainState, eval_step: Callable, batches) -> dict[str, Any]:
    """Runs ``eval_step`` over an iterable of batches and finalizes the stats."""
    total = None
    for batch in batches:
        total = merge_stats(total, eval_step(state, batch))
    if total is None:
        raise ValueError("evaluate: batches is empty; expected at least one batch")
    return finalize_stats(total)


def _apply(model, variables, inputs, *, train, rngs, mutable, **extra):
    if mutable:
        outputs, new_state = model.apply(variables, inputs, train=train, rngs=rngs, mutable=mutable, **extra)
        return outputs, dict(new_state)
    return model.apply(variables, inputs, train=train, rngs=rngs, **extra), {}


def _split_loss(out: LossOutput) -> tuple[jax.Array, dict[str, jax.Array]]:
    loss, aux = out if isinstance(out, tuple) else (out, {})
    loss = jnp.asarray(loss)
    if loss.ndim != 0:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {loss.shape}")
    return loss, dict(aux)


def _get(batch: Batch, key: str, where: str) -> jax.Array:
    if not isinstance(batch, Mapping):
        raise TypeError(f"{where}: batch must be a mapping of arrays, got {type(batch).__name__}")
    if key not in batch:
        raise ValueError(f"{where}: batch has no entry {key!r}; it has {sorted(batch)}")
    return batch[key]
