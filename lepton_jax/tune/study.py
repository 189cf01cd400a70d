"""Hyper-parameter studies on Optuna: samplers, pruners, storage and the trial loop.

``run`` searches a ``space`` over a config dataclass with any Optuna sampler
(grid, random, TPE, GP, CMA-ES, NSGA-II) and pruner, in an Optuna RDB
storage (an SQLite file by default; ``postgresql://...`` to share a study
between processes and machines). It runs until ``n_trials`` trials of the
study have finished (completed or pruned), counting those of earlier runs and
of other workers, so a study killed midway continues where it stopped.
"""

from __future__ import annotations

import inspect
import math
import os
import threading
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import optuna

from lepton_jax import registry
from lepton_jax.train.hooks import Hook
from lepton_jax.tune import space as space_lib

SAMPLERS = ("grid", "random", "tpe", "gp", "cmaes", "nsga2")
PRUNERS = ("none", "median", "hyperband")
DIRECTIONS = ("maximize", "minimize")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
# A trial whose process died stops beating; after the grace period any worker marks it failed.
HEARTBEAT_SECONDS, GRACE_SECONDS = 2, 6


def make_sampler(name: str, space: Mapping[str, Any], seed: int | None = None) -> optuna.samplers.BaseSampler:
    """Optuna's sampler called ``name`` (one of ``SAMPLERS``), seeded."""
    if name == "grid":
        return optuna.samplers.GridSampler(space_lib.grid(space), seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "gp":
        try:
            import torch  # noqa: F401  (Optuna's GP sampler runs on PyTorch)
        except ImportError:
            raise ValueError("tune: the gp sampler needs PyTorch: pip install 'lepton_jax[gp]'") from None
        return optuna.samplers.GPSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ValueError(f"tune: sampler must be one of {SAMPLERS}, got {name!r}")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """Optuna's pruner called ``name`` (one of ``PRUNERS``)."""
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    raise ValueError(f"tune: pruner must be one of {PRUNERS}, got {name!r}")


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage (``sqlite:///path``, ``postgresql://...``) with
    heartbeats, so the trials of a killed process are marked failed."""
    with warnings.catch_warnings():  # heartbeats are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS)


def sqlite_url(path: str | os.PathLike) -> str:
    """The SQLAlchemy URL of an SQLite file (created with its folder when needed)."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"sqlite:///{path}"


class PruningHook(Hook):
    """Reports ``metric`` of each evaluation row to an Optuna trial and stops
    ``fit`` when the trial's pruner says so (``pruned`` is then True; raise
    ``optuna.TrialPruned`` after ``fit`` returns)."""

    def __init__(self, trial: optuna.trial.BaseTrial, metric: str) -> None:
        super().__init__()
        self.trial, self.metric, self.pruned = trial, metric, False

    def on_log(self, loop: Any, row: Mapping[str, Any]) -> None:
        if row.get("split") != "eval":
            return
        if self.metric not in row:
            raise KeyError(f"tune: metric {self.metric!r} is not in the evaluation rows, which have "
                           f"{sorted(k for k in row if k not in ('step', 'split'))}")
        self.trial.report(float(row[self.metric]), step=int(loop.step))
        if self.trial.should_prune():
            self.pruned = True
            loop.request_stop(f"pruned by the study's pruner at step {loop.step} "
                              f"({self.metric} {float(row[self.metric]):.6g})")


def _check_directions(directions: Sequence[str]) -> list[str]:
    directions = [directions] if isinstance(directions, str) else list(directions)
    if not directions or any(d not in DIRECTIONS for d in directions):
        raise ValueError(f"tune: each direction must be one of {DIRECTIONS}, got {directions}")
    return directions


def _has_room(study: optuna.Study, trial: optuna.trial.Trial, n_trials: int, heartbeats: bool) -> bool:
    """Whether ``trial`` is needed to reach ``n_trials`` finished trials.

    Trials started before it and still running count as future finishes;
    while they alone could fill the budget it waits (they may fail, e.g. a
    killed worker's, which heartbeats mark failed after the grace period).
    """
    while True:
        if heartbeats:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        finished = sum(t.state in FINISHED for t in trials)
        ahead = sum(t.state == optuna.trial.TrialState.RUNNING and t.number < trial.number for t in trials)
        if finished >= n_trials:
            return False
        if finished + ahead < n_trials or not heartbeats:  # without heartbeats a dead trial never ends
            return True
        time.sleep(HEARTBEAT_SECONDS)


def suggest(trial: optuna.trial.BaseTrial, name: str, distribution: Any) -> Any:
    """``trial``'s value for ``name`` from an Optuna distribution (the public ``suggest_*`` calls)."""
    if isinstance(distribution, optuna.distributions.FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log,
                                   step=distribution.step)
    if isinstance(distribution, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, log=distribution.log,
                                 step=distribution.step)
    if isinstance(distribution, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    raise TypeError(f"tune: {name}: unsupported distribution {type(distribution).__name__}")


class _BudgetReached(Exception):
    """Other workers already run the study's last trials."""


def run(objective: Callable[..., Any] | str | Any, space: Sequence[str] | Mapping[str, Any], *,
        config: Any = None, n_trials: int, sampler: str | optuna.samplers.BaseSampler = "tpe",
        pruner: str | optuna.pruners.BasePruner = "none", storage: str | None = None,
        study_name: str = "lepton_jax", directions: Sequence[str] | str = "maximize", seed: int | None = None,
        callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
        population: int = 1, population_fields: Sequence[str] | None = None,
        metric: str | Sequence[str] | None = None, out: str | None = None) -> optuna.Study:
    """Searches ``space`` over ``config`` until the study holds ``n_trials`` finished trials.

    Args:
      objective: a registered recipe (its name or ``registry.Recipe``: each
        trial trains it under ``out/trials/NNNN``, scored by ``metric`` on the
        validation split), or ``objective(config)`` or ``objective(config, trial)`` -> the
        value (a float, or one per direction); with ``trial`` it may report
        intermediate values for pruning (``trial.report``/``should_prune``,
        or ``PruningHook`` in ``fit``) and raise ``optuna.TrialPruned``.
      space: ``--space`` strings (``"learning_rate=loguniform(1e-4,1e-1)"``)
        or ``{field: optuna distribution}``; checked before any trial runs.
      config: the config dataclass each trial's values are set in (a
        recipe's: its default config unless given).
      n_trials: the number of finished (completed or pruned) trials to reach.
      sampler / pruner: a name from ``SAMPLERS``/``PRUNERS`` or an Optuna object.
      storage: an RDB URL (``sqlite:///study.db``, ``postgresql://...``);
        ``None`` keeps the study in memory.
      study_name: the study to create or continue in ``storage``.
      directions: ``"maximize"``/``"minimize"``, one per objective value.
      seed: seeds the sampler.
      callbacks: Optuna callbacks ``(study, frozen_trial)`` after each trial.
      population: run up to this many trials at once as one program: then
        ``objective(configs, trials)`` gets the configs of trials that differ
        only in ``population_fields`` and returns a list of values (an
        ``optuna.TrialPruned`` instance for a member its pruner stopped).
        Each is still an ordinary trial of the study.
      population_fields: the fields a population's members may differ in
        (default: the recipe's, else the searched float fields); the others
        split trials into groups.
      metric: with a recipe, its validation metric(s) (e.g. ``"accuracy"``;
        ``"params"`` counts parameters), one per direction.
      out: with a recipe, the trials' folder (default ``runs/tune/NAME``).

    Returns:
      The ``optuna.Study`` (``optuna.load_study`` opens the same study from ``storage``).
    """
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"tune: n_trials must be a positive int, got {n_trials!r}")
    directions = _check_directions(directions)
    if isinstance(objective, (str, registry.Recipe)):
        from lepton_jax.tune.recipes import RecipeObjective

        prune = not (pruner == "none" or isinstance(pruner, optuna.pruners.NopPruner))
        name = objective if isinstance(objective, str) else objective.name
        recipe_objective = RecipeObjective(objective, metric or [], out or os.path.join("runs", "tune", name),
                                           prune=prune)
        config = recipe_objective.recipe.config if config is None else config
        if population_fields is None and population > 1:
            population_fields = recipe_objective.recipe.population_fields
        objective = recipe_objective.population if population > 1 else recipe_objective
    elif metric is not None or out is not None:
        raise ValueError("tune: metric= and out= are for a recipe; an objective function returns its own values")
    if config is None:
        raise ValueError("tune: give config=, the config dataclass the space is searched over")
    distributions = (space_lib.parse_space(space, config) if not isinstance(space, Mapping) else dict(space))
    if isinstance(sampler, str):
        if sampler == "nsga2" and len(directions) < 2:
            raise ValueError("tune: the nsga2 sampler searches two or more metrics; give a direction per metric")
        sampler = make_sampler(sampler, distributions, seed)
    if isinstance(pruner, str):
        if pruner != "none" and len(directions) > 1:
            raise ValueError(f"tune: Optuna prunes single-metric studies only; --pruner {pruner} with "
                             f"{len(directions)} metrics")
        pruner = make_pruner(pruner)
    if isinstance(storage, str):
        storage = make_storage(storage)
    heartbeats = bool(getattr(storage, "heartbeat_interval", None))
    study = optuna.create_study(
        storage=storage, study_name=study_name,
        sampler=sampler, pruner=pruner, directions=directions, load_if_exists=True)
    if list(study.directions) != [optuna.study.StudyDirection[d.upper()] for d in directions]:
        raise ValueError(f"tune: the study {study_name!r} in {getattr(storage, 'url', storage)} has directions "
                         f"{[d.name.lower() for d in study.directions]}, got {directions}")
    if isinstance(population, bool) or not isinstance(population, int) or population < 1:
        raise ValueError(f"tune: population must be a positive int, got {population!r}")
    if population_fields is None:
        population_fields = [name for name, d in distributions.items()
                             if isinstance(d, optuna.distributions.FloatDistribution)]
    batcher = _Batcher(population, objective, set(population_fields)) if population > 1 else None
    takes_trial = len(inspect.signature(objective).parameters) >= 2

    def trial_objective(trial: optuna.trial.Trial) -> Any:
        if heartbeats:
            # Optuna's heartbeat thread writes its first beat some time after
            # the trial starts; a process killed before it leaves a RUNNING
            # trial with no beat, which is never marked stale, and the other
            # workers would wait for it forever. Beat before anything runs.
            storage.record_heartbeat(trial._trial_id)
        if not _has_room(study, trial, n_trials, heartbeats):
            study.stop()
            raise _BudgetReached(f"{n_trials} trials are finished or running")
        params = {name: suggest(trial, name, distribution) for name, distribution in distributions.items()}
        trial_config = space_lib.apply_params(config, params)
        if batcher is not None:
            value = batcher.submit(trial_config, trial, params)
        else:
            value = objective(trial_config, trial) if takes_trial else objective(trial_config)
        if isinstance(value, optuna.TrialPruned):
            raise value
        values = list(value) if isinstance(value, (tuple, list)) else [value]
        if len(values) != len(directions) or not all(isinstance(v, (int, float)) for v in values):
            raise ValueError(f"tune: the objective must return {len(directions)} number(s), got {value!r}")
        return tuple(float(v) for v in values) if len(values) > 1 else float(values[0])

    def stop_when_done(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
        if sum(t.state in FINISHED for t in study.get_trials(deepcopy=False)) >= n_trials:
            study.stop()

    remaining = n_trials - sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
    if remaining > 0:
        # At most the remaining trials from this process; with other workers,
        # _has_room keeps the study from passing n_trials.
        study.optimize(trial_objective, n_trials=remaining, catch=(_BudgetReached,),
                       callbacks=[stop_when_done, *callbacks], n_jobs=min(population, remaining))
        if batcher is not None and batcher.failure is not None:
            raise batcher.failure  # Optuna's threads record it on the trials; raise it as one process would
    return study


class _Member:
    def __init__(self, config: Any, trial: optuna.trial.Trial) -> None:
        self.config, self.trial = config, trial
        self.done, self.value, self.error = False, None, None


class _Batcher:
    """Collects the trials that Optuna's ``population`` threads ask for and runs
    each group of like trials (same non-population fields) as one call of the
    population objective: a group starts when it is full, or when no trial has
    arrived for ``IDLE_SECONDS`` (the budget or the other groups hold the rest)."""

    IDLE_SECONDS = 0.5

    def __init__(self, size: int, objective: Callable[..., Any], population_fields: set[str]) -> None:
        self.size, self.objective, self.population_fields = size, objective, population_fields
        self.condition = threading.Condition()
        self.pending: dict[tuple, list[_Member]] = {}
        self.last_arrival = time.monotonic()
        self.failure: BaseException | None = None

    def submit(self, config: Any, trial: optuna.trial.Trial, params: Mapping[str, Any]) -> Any:
        key = tuple(sorted((k, repr(v)) for k, v in params.items() if k not in self.population_fields))
        member = _Member(config, trial)
        with self.condition:
            self.pending.setdefault(key, []).append(member)
            self.last_arrival = time.monotonic()
            self.condition.notify_all()
            group = None
            while not member.done:
                waiting = self.pending.get(key)
                idle = time.monotonic() - self.last_arrival >= self.IDLE_SECONDS
                if waiting and member in waiting and (len(waiting) >= self.size or idle):
                    group = self.pending.pop(key)
                    break
                self.condition.wait(timeout=0.1)
        if group is not None:
            self._run(group)
        if member.error is not None:
            raise member.error
        return member.value

    def _run(self, group: list[_Member]) -> None:
        try:
            values = list(self.objective([m.config for m in group], [m.trial for m in group]))
            if len(values) != len(group):
                raise ValueError(f"tune: the population objective must return {len(group)} values, got {len(values)}")
        except BaseException as error:  # every member's trial fails with it
            values, failure = [None] * len(group), error
            self.failure = self.failure or error
        else:
            failure = None
        with self.condition:
            for member, value in zip(group, values):
                member.value, member.error, member.done = value, failure, True
            self.condition.notify_all()


def best_trials(study: optuna.Study, k: int = 5) -> list[optuna.trial.FrozenTrial]:
    """The ``k`` best completed trials of a single-metric study (its Pareto front if multi-metric)."""
    if len(study.directions) > 1:
        return study.best_trials
    completed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                 if t.value is not None and not math.isnan(t.value)]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(completed, key=lambda t: t.value, reverse=reverse)[:k]


__all__ = ["DIRECTIONS", "PRUNERS", "SAMPLERS", "PruningHook", "best_trials", "make_pruner", "make_sampler",
           "make_storage", "run", "sqlite_url", "suggest"]
