"""Classification metrics that accumulate exactly across batches.

Per-batch functions return additive sufficient statistics (counts and a
confusion matrix); sum them over batches with ``merge_counts`` and turn the
total into rates with ``compute_classification_metrics``. A ``mask`` marks
real examples in padded batches.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from lepton_jax.ops import _checks


def _mask_or_ones(where: str, mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    _checks.check_mask(where, mask, shape)
    return jnp.ones(shape, bool) if mask is None else mask.astype(bool)


def _topk_hits(where: str, logits_BxC: jax.Array, labels_B: jax.Array, k: int) -> jax.Array:
    _checks.check_labels(where, logits_BxC, labels_B)
    num_classes = logits_BxC.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"{where}: k must be in [1, {num_classes}] (the number of classes), got {k}")
    label_logit = jnp.take_along_axis(logits_BxC, labels_B[..., None], axis=-1)
    # Rank = number of classes scoring strictly higher; ties favour the label.
    rank = jnp.sum(logits_BxC > label_logit, axis=-1)
    return rank < k


def accuracy(logits_BxC: jax.Array, labels_B: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    """Fraction of (masked) examples whose argmax is the label; 0 when none.

    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    >>> float(accuracy(logits, jnp.array([0, 1, 1])))  # doctest: +ELLIPSIS
    0.666...
    >>> float(accuracy(logits, jnp.array([0, 1, 1]), mask=jnp.array([True, True, False])))
    1.0
    """
    return top_k_accuracy(logits_BxC, labels_B, 1, mask=mask, _where="accuracy")


def top_k_accuracy(
    logits_BxC: jax.Array, labels_B: jax.Array, k: int, *, mask: jax.Array | None = None, _where: str = "top_k_accuracy"
) -> jax.Array:
    """Fraction of (masked) examples whose label is among the top ``k`` logits."""
    hits = _topk_hits(_where, logits_BxC, labels_B, k)
    valid = _mask_or_ones(_where, mask, labels_B.shape)
    return jnp.sum(hits & valid) / jnp.maximum(jnp.sum(valid), 1)


def confusion_matrix(
    labels_B: jax.Array, predictions_B: jax.Array, num_classes: int, *, mask: jax.Array | None = None
) -> jax.Array:
    """``[C, C]`` int32 counts; row = true class, column = predicted class.

    >>> import jax.numpy as jnp
    >>> confusion_matrix(jnp.array([0, 1, 1]), jnp.array([0, 0, 1]), 2).tolist()
    [[1, 0], [1, 1]]
    """
    _checks.check_integer("confusion_matrix", "labels", labels_B)
    _checks.check_integer("confusion_matrix", "predictions", predictions_B)
    _checks.check_same_shape("confusion_matrix", "labels", labels_B, "predictions", predictions_B)
    valid = _mask_or_ones("confusion_matrix", mask, labels_B.shape)
    index = jnp.where(valid, labels_B * num_classes + predictions_B, num_classes * num_classes)
    counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def classification_counts(
    logits_BxC: jax.Array,
    labels_B: jax.Array,
    *,
    num_classes: int,
    mask: jax.Array | None = None,
    top_k: Sequence[int] = (1,),
) -> dict[str, jax.Array]:
    """Additive statistics of one batch: ``count``, ``top{k}_correct`` for each
    ``k`` and the ``confusion`` matrix ``[C, C]``."""
    where = "classification_counts"
    _checks.check_labels(where, logits_BxC, labels_B)
    if logits_BxC.shape[-1] != num_classes:
        raise ValueError(f"{where}: logits must have {num_classes} classes (num_classes), got {logits_BxC.shape[-1]}")
    valid = _mask_or_ones(where, mask, labels_B.shape)
    counts = {"count": jnp.sum(valid).astype(jnp.float32)}
    for k in top_k:
        counts[f"top{k}_correct"] = jnp.sum(_topk_hits(where, logits_BxC, labels_B, k) & valid).astype(jnp.float32)
    predictions = jnp.argmax(logits_BxC, axis=-1).astype(labels_B.dtype)
    counts["confusion"] = confusion_matrix(labels_B, predictions, num_classes, mask=valid)
    return counts


def merge_counts(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums two batches' ``classification_counts``."""
    if set(a) != set(b):
        raise ValueError(f"merge_counts: the counts have different keys {sorted(a)} and {sorted(b)}")
    return jax.tree.map(jnp.add, a, b)


def compute_classification_metrics(counts: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Rates from accumulated counts.

    Returns ``accuracy``, ``top{k}_accuracy`` for each counted ``k``, per-class
    ``precision``, ``recall``, ``f1`` and ``support`` arrays ``[C]`` and their
    unweighted means ``macro_precision``, ``macro_recall``, ``macro_f1``.
    A rate whose denominator is 0 is 0 (scikit-learn's ``zero_division=0``).
    """
    confusion = jnp.asarray(counts["confusion"]).astype(jnp.float32)
    total = jnp.sum(confusion)
    true_positive = jnp.diag(confusion)
    predicted = jnp.sum(confusion, axis=0)
    support = jnp.sum(confusion, axis=1)
    precision = _safe_divide(true_positive, predicted)
    recall = _safe_divide(true_positive, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    result: dict[str, jax.Array] = {"accuracy": _safe_divide(jnp.sum(true_positive), total)}
    for name, value in counts.items():
        if name.startswith("top") and name.endswith("_correct"):
            result[name.replace("_correct", "_accuracy")] = _safe_divide(value, counts["count"])
    result.update(precision=precision, recall=recall, f1=f1, support=support.astype(jnp.int32),
                  macro_precision=jnp.mean(precision), macro_recall=jnp.mean(recall), macro_f1=jnp.mean(f1))
    return result


def classification_report(
    confusion: Any, class_names: Sequence[str] | None = None, digits: int = 3
) -> str:
    """A text table of per-class precision, recall, F1 and support, then the
    accuracy and the macro average, from a ``[C, C]`` confusion matrix."""
    confusion = jnp.asarray(confusion)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"classification_report: confusion must be square [C, C], got shape {confusion.shape}")
    num_classes = confusion.shape[0]
    names = [str(c) for c in (class_names if class_names is not None else range(num_classes))]
    if len(names) != num_classes:
        raise ValueError(f"classification_report: class_names must have {num_classes} names, got {len(names)}")
    m = jax.device_get(compute_classification_metrics({"confusion": confusion}))
    width = max(12, *(len(n) for n in names))
    header = f"{'':>{width}} {'precision':>10} {'recall':>10} {'f1-score':>10} {'support':>10}"
    lines = [header, ""]
    for i, name in enumerate(names):
        lines.append(f"{name:>{width}} {m['precision'][i]:>10.{digits}f} {m['recall'][i]:>10.{digits}f} "
                     f"{m['f1'][i]:>10.{digits}f} {int(m['support'][i]):>10d}")
    total = int(m["support"].sum())
    lines += ["", f"{'accuracy':>{width}} {'':>10} {'':>10} {float(m['accuracy']):>10.{digits}f} {total:>10d}",
              f"{'macro avg':>{width}} {float(m['macro_precision']):>10.{digits}f} "
              f"{float(m['macro_recall']):>10.{digits}f} {float(m['macro_f1']):>10.{digits}f} {total:>10d}"]
    return "\n".join(lines)


@struct.dataclass
class MeanMetric:
    """A running mean as a pytree (usable inside jit): ``total / count``."""

    total: jax.Array
    count: jax.Array

    @classmethod
    def empty(cls) -> "MeanMetric":
        return cls(total=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.float32))

    def update(self, values: jax.Array, mask: jax.Array | None = None) -> "MeanMetric":
        values = jnp.asarray(values, jnp.float32)
        _checks.check_mask("MeanMetric.update", mask, values.shape)
        weights = jnp.ones(values.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
        return MeanMetric(total=self.total + jnp.sum(values * weights), count=self.count + jnp.sum(weights))

    def merge(self, other: "MeanMetric") -> "MeanMetric":
        return MeanMetric(total=self.total + other.total, count=self.count + other.count)

    def compute(self) -> jax.Array:
        return _safe_divide(self.total, self.count)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    denominator = jnp.asarray(denominator, jnp.float32)
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)
