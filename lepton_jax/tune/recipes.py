"""A registered recipe as a tuning objective: each trial trains the recipe
in its own output folder and is scored on the validation split."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Mapping, Sequence

import optuna

from lepton_jax import config as config_lib
from lepton_jax import registry
from lepton_jax.tune.study import PruningHook


def metric_value(results: Mapping[str, Any], metric: str) -> float:
    """``metric`` of a recipe's results: a validation metric, or ``"params"``."""
    if metric in ("params", "num_params"):
        return float(results["num_params"])
    val = results.get("val_metrics") or {}
    if metric not in val:
        raise ValueError(f"--metric {metric!r} is not a validation metric of this recipe; it reports "
                         f"{sorted(val)} and 'params'")
    return float(val[metric])


class RecipeObjective:
    """Trains ``recipe`` per trial under ``out/trials/NNNN`` (its printout in
    ``log.txt`` there) and returns ``metrics`` of its validation split.

    Call it as ``objective(config, trial)``; ``population(configs, trials)``
    trains like trials as one program (``recipe.population``). With
    ``prune``, every evaluation is reported to the trial and a pruned trial
    stops early (``optuna.TrialPruned``).
    """

    def __init__(self, recipe: str | registry.Recipe, metrics: str | Sequence[str], out: str, *,
                 prune: bool = False) -> None:
        self.recipe = registry.get(recipe) if isinstance(recipe, str) else recipe
        if self.recipe.run is None or self.recipe.config is None:
            raise ValueError(f"recipe {self.recipe.name!r} does not support tuning (its Recipe has no config/run)")
        self.metrics = [metrics] if isinstance(metrics, str) else list(metrics)
        if not self.metrics:
            raise ValueError("give --metric, a validation metric of the recipe (e.g. --metric accuracy)")
        self.out, self.prune = os.path.abspath(out), prune
        fields = {f.name for f in dataclasses.fields(self.recipe.config)}
        if "out" not in fields:
            raise ValueError(f"recipe {self.recipe.name!r}: its config has no 'out' field for the trials' outputs")
        self._quiet = {"progress": False} if "progress" in fields else {}

    def trial_config(self, config: Any, trial: optuna.trial.Trial) -> Any:
        """``config`` writing to the trial's folder (recorded with the whole config on the trial)."""
        config = dataclasses.replace(config, out=os.path.join(self.out, "trials", f"{trial.number:04d}"),
                                     **self._quiet)
        trial.set_user_attr("out", config.out)
        trial.set_user_attr("config", config_lib.to_dict(config))
        return config

    def _values(self, results: Mapping[str, Any]) -> Any:
        values = [metric_value(results, m) for m in self.metrics]
        return tuple(values) if len(values) > 1 else values[0]

    def __call__(self, config: Any, trial: optuna.trial.Trial) -> Any:
        config = self.trial_config(config, trial)
        pruning = PruningHook(trial, self.metrics[0]) if self.prune else None
        os.makedirs(config.out, exist_ok=True)
        with open(os.path.join(config.out, "log.txt"), "w", encoding="utf-8") as log, \
                contextlib.redirect_stdout(log):  # the recipe's own printout, one file per trial
            results = self.recipe.run(config, [pruning] if pruning else [])
        if pruning is not None and pruning.pruned:
            raise optuna.TrialPruned(results.get("stop_reason") or "pruned")
        return self._values(results)

    def population(self, configs: Sequence[Any], trials: Sequence[optuna.trial.Trial]) -> list[Any]:
        """The values of like trials trained as one program (a pruned member's: ``TrialPruned``)."""
        if self.recipe.population is None:
            raise ValueError(f"recipe {self.recipe.name!r} cannot train a population (its Recipe has no population)")
        configs = [self.trial_config(c, t) for c, t in zip(configs, trials)]
        pruned = [False] * len(trials)

        def report(k: int, step: int, val: Mapping[str, Any]) -> None:
            if self.prune and not pruned[k]:
                trials[k].report(metric_value({"val_metrics": val}, self.metrics[0]), step)
                pruned[k] = trials[k].should_prune()

        results = self.recipe.population(configs, report)
        return [optuna.TrialPruned(f"pruned by the study's pruner (member {k} of a population)") if pruned[k]
                else self._values(result) for k, result in enumerate(results)]


__all__ = ["RecipeObjective", "metric_value"]
