"""Functional ops: activations, losses, regularization, metrics, normalization,
attention and the fused linear cross-entropy.

Each op is a pure ``jax.numpy`` function (the reference the Pallas kernels are
tested against); ``dispatch`` chooses between the implementations.
"""

from lepton_jax.ops import activations, dispatch, losses, metrics, normalization, regularization
from lepton_jax.ops.attention import attention, attention_reference
from lepton_jax.ops.cross_entropy import linear_cross_entropy
from lepton_jax.ops.activations import get_activation
from lepton_jax.ops.losses import (
    binary_cross_entropy,
    distillation_loss,
    mae,
    mse,
    softmax_cross_entropy,
    softmax_cross_entropy_with_probs,
)
from lepton_jax.ops.metrics import (
    MeanMetric,
    accuracy,
    classification_counts,
    classification_report,
    compute_classification_metrics,
    confusion_matrix,
    merge_counts,
    top_k_accuracy,
)
from lepton_jax.ops.normalization import layer_norm, rms_norm
from lepton_jax.ops.ring_attention import mesh_axis_of, ring_attention, sequence_axis, sequence_parallel_attention
from lepton_jax.ops.regularization import l1_penalty, l2_penalty, weight_mask

__all__ = [
    "MeanMetric", "accuracy", "activations", "attention", "attention_reference", "binary_cross_entropy", "classification_counts",
    "classification_report", "compute_classification_metrics", "confusion_matrix", "dispatch", "distillation_loss", "get_activation",
    "l1_penalty", "l2_penalty", "layer_norm", "linear_cross_entropy", "losses", "mae", "merge_counts", "mesh_axis_of", "metrics", "mse",
    "normalization", "regularization", "ring_attention", "rms_norm", "sequence_axis", "sequence_parallel_attention", "softmax_cross_entropy",
    "softmax_cross_entropy_with_probs", "top_k_accuracy", "weight_mask",
]
