"""Training harness: TrainState, pure step builders, the ``fit`` loop and its hooks, logging."""

from lepton_jax.train.logging import History, MetricLogger, plot_history, scalar_metrics
from lepton_jax.train.hooks import (
    Checkpoint,
    Evaluate,
    FunctionHook,
    Hook,
    MetricFiles,
    PlotCurves,
    Preemption,
    ProgressBar,
    Throughput,
    TrainMetrics,
    default_hooks,
    every,
)
from lepton_jax.train.loop import FitResult, Loop, fit
from lepton_jax.train.plateau import EarlyStopping, ReduceLROnPlateau
from lepton_jax.train.loss_scale import DynamicLossScale, all_finite, as_loss_scale
from lepton_jax.train.state import TrainState, count_params, create_population_state, create_train_state
from lepton_jax.train.step import (
    classification_loss,
    evaluate,
    finalize_stats,
    make_eval_step,
    make_train_step,
    merge_stats,
)

__all__ = [
    "Checkpoint",
    "DynamicLossScale",
    "EarlyStopping",
    "Evaluate",
    "FitResult",
    "FunctionHook",
    "History",
    "Hook",
    "Loop",
    "MetricFiles",
    "MetricLogger",
    "PlotCurves",
    "Preemption",
    "ProgressBar",
    "ReduceLROnPlateau",
    "Throughput",
    "TrainMetrics",
    "TrainState",
    "all_finite",
    "as_loss_scale",
    "classification_loss",
    "count_params",
    "create_population_state", "create_train_state",
    "default_hooks",
    "evaluate",
    "every",
    "finalize_stats",
    "fit",
    "make_eval_step",
    "make_train_step",
    "merge_stats",
    "plot_history",
    "scalar_metrics",
]
