"""Training harness: TrainState, pure step builders, the ``fit`` loop, logging."""

from lepton_jax.train.logging import History, MetricLogger, plot_history, scalar_metrics
from lepton_jax.train.loop import FitResult, fit
from lepton_jax.train.loss_scale import DynamicLossScale, all_finite
from lepton_jax.train.state import TrainState, count_params, create_train_state
from lepton_jax.train.step import (
    classification_loss,
    evaluate,
    finalize_stats,
    make_eval_step,
    make_train_step,
    merge_stats,
)

__all__ = [
    "DynamicLossScale",
    "FitResult",
    "History",
    "MetricLogger",
    "TrainState",
    "all_finite",
    "classification_loss",
    "count_params",
    "create_train_state",
    "evaluate",
    "finalize_stats",
    "fit",
    "make_eval_step",
    "make_train_step",
    "merge_stats",
    "plot_history",
    "scalar_metrics",
]
