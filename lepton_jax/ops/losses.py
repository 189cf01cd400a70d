"""Losses: regression, softmax and binary cross-entropy.

Every loss takes ``reduction="mean" | "sum" | "none"``; cross-entropies are
computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lepton_jax.ops import _checks


def mse(predictions: jax.Array, targets: jax.Array, *, reduction: str = "mean") -> jax.Array:
    """Mean squared error, elementwise ``(predictions - targets) ** 2``; same shapes required.

    >>> import jax.numpy as jnp
    >>> float(mse(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0])))
    2.0
    >>> mse(jnp.array([1.0, 2.0]), jnp.array([1.0, 4.0]), reduction="none").tolist()
    [0.0, 4.0]
    """
    _checks.check_floating("mse", "predictions", predictions)
    _checks.check_same_shape("mse", "predictions", predictions, "targets", targets)
    return _checks.reduce("mse", jnp.square(predictions - targets), reduction)


def mae(predictions: jax.Array, targets: jax.Array, *, reduction: str = "mean") -> jax.Array:
    """Mean absolute error, elementwise ``|predictions - targets|``; same shapes required."""
    _checks.check_floating("mae", "predictions", predictions)
    _checks.check_same_shape("mae", "predictions", predictions, "targets", targets)
    return _checks.reduce("mae", jnp.abs(predictions - targets), reduction)


def softmax_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    ignore_index: int | None = -100,
    mask: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Cross-entropy of ``softmax(logits)`` against integer labels.

    Args:
      logits: ``[..., C]`` float.
      labels: ``[...]`` integer in ``[0, C)`` (or ``ignore_index``). Labels out
        of range are a caller bug that cannot be checked under jit.
      label_smoothing: ``eps``: the target is ``(1 - eps)`` on the label plus
        ``eps / C`` on every class.
      ignore_index: positions whose label equals it contribute 0 and are left
        out of the mean's denominator. ``None`` disables it.
      mask: optional ``[...]`` bool; False positions are ignored likewise.
      reduction: "mean" over the counted positions (0 when none), "sum", or
        "none" (``[...]``, 0 at ignored positions).

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    >>> round(float(softmax_cross_entropy(logits, jnp.array([0, -100]))), 4)  # -ln 0.5; the second is ignored
    0.6931
    """
    where_name = "softmax_cross_entropy"
    _checks.check_floating(where_name, "logits", logits)
    _checks.check_labels(where_name, logits, labels)
    _checks.check_mask(where_name, mask, jnp.shape(labels), "mask")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{where_name}: label_smoothing must be in [0, 1), got {label_smoothing}")
    valid = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
    if ignore_index is not None:
        valid = valid & (labels != ignore_index)
    safe_labels = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
    if label_smoothing > 0.0:
        uniform = -jnp.mean(log_probs, axis=-1)
        nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
    # where, not multiply: a masked position with inf logits must not make NaN.
    per_position = jnp.where(valid, nll, 0.0)
    return _checks.reduce(where_name, per_position, reduction, weights=valid.astype(jnp.float32))


def softmax_cross_entropy_with_probs(
    logits: jax.Array, target_probs: jax.Array, *, reduction: str = "mean"
) -> jax.Array:
    """Cross-entropy against soft targets ``target_probs`` ``[..., C]`` (e.g. a teacher's)."""
    _checks.check_floating("softmax_cross_entropy_with_probs", "logits", logits)
    _checks.check_same_shape("softmax_cross_entropy_with_probs", "logits", logits, "target_probs", target_probs)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    per_position = -jnp.sum(target_probs.astype(jnp.float32) * log_probs, axis=-1)
    return _checks.reduce("softmax_cross_entropy_with_probs", per_position, reduction)


def binary_cross_entropy(
    inputs: jax.Array,
    targets: jax.Array,
    *,
    from_logits: bool = True,
    reduction: str = "mean",
) -> jax.Array:
    """Elementwise binary cross-entropy; ``targets`` in ``[0, 1]`` with ``inputs``' shape.

    With ``from_logits`` (default) ``inputs`` are logits and the loss uses the
    stable ``softplus(x) - t * x`` form; otherwise they are probabilities,
    clipped away from 0 and 1 before the log.
    """
    _checks.check_floating("binary_cross_entropy", "inputs", inputs)
    _checks.check_same_shape("binary_cross_entropy", "inputs", inputs, "targets", targets)
    x = inputs.astype(jnp.float32)
    t = jnp.asarray(targets).astype(jnp.float32)
    if from_logits:
        per_element = jax.nn.softplus(x) - t * x
    else:
        eps = 1e-7
        p = jnp.clip(x, eps, 1.0 - eps)
        per_element = -(t * jnp.log(p) + (1.0 - t) * jnp.log1p(-p))
    return _checks.reduce("binary_cross_entropy", per_element, reduction)


def distillation_loss(
    student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 2.0, reduction: str = "mean"
) -> jax.Array:
    """Knowledge distillation (Hinton et al. 2015): ``T**2 * KL(softmax(teacher / T)
    || softmax(student / T))`` over the last axis, in fp32.

    ``student_logits`` and ``teacher_logits`` are ``[..., C]`` floats of the same
    shape; gradients reach the student only (the teacher is a constant). The
    ``T**2`` keeps the gradient scale independent of the temperature.
    ``reduction``: "mean", "sum" or "none" (``[...]``).

    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[1.0, 2.0, 0.5]])
    >>> float(distillation_loss(logits, logits))
    0.0
    """
    where = "distillation_loss"
    _checks.check_floating(where, "student_logits", student_logits)
    _checks.check_floating(where, "teacher_logits", teacher_logits)
    _checks.check_same_shape(where, "student_logits", student_logits, "teacher_logits", teacher_logits)
    if not temperature > 0:
        raise ValueError(f"{where}: temperature must be > 0, got {temperature}")
    teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    student = student_logits.astype(jnp.float32) / temperature
    log_p_teacher = jax.nn.log_softmax(teacher, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - jax.nn.log_softmax(student, axis=-1)), axis=-1)
    return _checks.reduce(where, kl * temperature**2, reduction)
