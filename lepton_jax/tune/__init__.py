"""Hyper-parameter search on Optuna: search spaces over recipe configs, studies
in SQLite or PostgreSQL, pruning from ``fit``'s evaluations (``lepton-jax tune``)."""

from lepton_jax.tune.recipes import RecipeObjective, metric_value
from lepton_jax.tune.space import apply_params, grid, parse_distribution, parse_space
from lepton_jax.tune.study import (
    DIRECTIONS, PRUNERS, SAMPLERS, PruningHook, best_trials, make_pruner, make_sampler, make_storage, run, sqlite_url,
    suggest,
)

__all__ = [
    "apply_params", "best_trials", "DIRECTIONS", "grid", "make_pruner", "make_sampler", "make_storage",
    "metric_value", "parse_distribution", "parse_space", "PRUNERS", "PruningHook", "RecipeObjective", "run",
    "SAMPLERS", "sqlite_url", "suggest",
]
