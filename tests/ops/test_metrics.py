"""Metrics against scikit-learn, accumulated over uneven, padded batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from lepton_jax import ops


def _data(n=103, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int32)
    # Informative but imperfect logits, and one class (4) that is never predicted.
    logits = rng.normal(size=(n, classes)).astype(np.float32) + 2.0 * np.eye(classes)[labels]
    logits[:, 4] -= 100.0
    return logits, labels


def test_accuracy_top_k_and_confusion_match_sklearn():
    logits, labels = _data()
    predictions = logits.argmax(-1)
    np.testing.assert_allclose(ops.accuracy(logits, labels), skm.accuracy_score(labels, predictions), rtol=1e-6)
    for k in (1, 2, 3):
        np.testing.assert_allclose(ops.top_k_accuracy(logits, labels, k),
                                   skm.top_k_accuracy_score(labels, logits, k=k, labels=range(5)), rtol=1e-6)
    np.testing.assert_array_equal(ops.confusion_matrix(jnp.asarray(labels), jnp.asarray(predictions), 5),
                                  skm.confusion_matrix(labels, predictions, labels=range(5)))


def test_counts_accumulated_over_padded_batches_equal_the_whole_dataset():
    logits, labels = _data()
    total = None
    for start, size in [(0, 40), (40, 7), (47, 56)]:  # uneven batches, each padded to 64
        pad = 64 - size
        batch_logits = np.concatenate([logits[start:start + size], np.zeros((pad, 5), np.float32)])
        batch_labels = np.concatenate([labels[start:start + size], np.zeros(pad, np.int32)])
        mask = np.arange(64) < size
        counts = jax.jit(ops.classification_counts, static_argnames=("num_classes", "top_k"))(
            batch_logits, batch_labels, num_classes=5, mask=mask, top_k=(1, 3))
        total = counts if total is None else ops.merge_counts(total, counts)
    result = ops.compute_classification_metrics(total)

    predictions = logits.argmax(-1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, predictions, labels=range(5), zero_division=0)
    np.testing.assert_allclose(result["precision"], precision, rtol=1e-6)
    np.testing.assert_allclose(result["recall"], recall, rtol=1e-6)
    np.testing.assert_allclose(result["f1"], f1, rtol=1e-6)
    np.testing.assert_array_equal(result["support"], support)
    macro = skm.precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    np.testing.assert_allclose([result["macro_precision"], result["macro_recall"], result["macro_f1"]],
                               macro[:3], rtol=1e-6)
    np.testing.assert_allclose(result["accuracy"], skm.accuracy_score(labels, predictions), rtol=1e-6)
    np.testing.assert_allclose(result["top3_accuracy"], skm.top_k_accuracy_score(labels, logits, k=3), rtol=1e-6)
    assert float(total["count"]) == len(labels)


def test_classification_report_and_mean_metric():
    confusion = np.array([[3, 1], [0, 4]])
    report = ops.classification_report(confusion, class_names=["cat", "dog"])
    assert "cat" in report and "macro avg" in report
    cat = [line for line in report.splitlines() if line.strip().startswith("cat")][0].split()
    assert cat[1:] == ["1.000", "0.750", "0.857", "4"]  # precision 3/3, recall 3/4

    metric = ops.MeanMetric.empty().update(jnp.array([1.0, 2.0, 9.0]), mask=jnp.array([True, True, False]))
    metric = metric.merge(ops.MeanMetric.empty().update(jnp.array([3.0])))
    assert float(metric.compute()) == 2.0
    assert float(ops.MeanMetric.empty().compute()) == 0.0


def test_metric_errors():
    logits, labels = _data(10)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\].*got 6"):
        ops.top_k_accuracy(logits, labels, 6)
    with pytest.raises(ValueError, match=r"mask must have shape \(10,\), got \(9,\)"):
        ops.accuracy(logits, labels, mask=np.ones(9, bool))
    with pytest.raises(TypeError, match="labels must be an integer array"):
        ops.accuracy(logits, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"logits must have 4 classes \(num_classes\), got 5"):
        ops.classification_counts(logits, labels, num_classes=4)
    with pytest.raises(ValueError, match=r"confusion must be square"):
        ops.classification_report(np.zeros((2, 3)))
