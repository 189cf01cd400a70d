"""tune.run against plain Optuna: same sampler, same trials; the budget counts
finished trials across runs and processes (a real PostgreSQL server shared by
two workers); pruning reaches the study."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys

import optuna
import pytest

from lepton_jax import tune

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclasses.dataclass(frozen=True)
class Config:
    x: float = 0.0
    n: int = 1
    kind: str = "a"


def quadratic(config: Config) -> float:
    return (config.x - 0.3) ** 2 + 0.1 * config.n + (config.kind == "b")


SPACE = ["x=uniform(-1,1)", "n=int(1,4)", "kind=choice(a,b)"]


def test_same_trials_as_plain_optuna_with_the_same_sampler():
    study = tune.run(quadratic, SPACE, config=Config(), n_trials=12, sampler="tpe", seed=3, directions="minimize")
    reference = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=3), direction="minimize")
    reference.optimize(lambda t: quadratic(Config(t.suggest_float("x", -1, 1), t.suggest_int("n", 1, 4),
                                                  t.suggest_categorical("kind", ["a", "b"]))), n_trials=12)
    assert [t.params for t in study.trials] == [t.params for t in reference.trials]
    assert [t.value for t in study.trials] == [t.value for t in reference.trials]
    assert study.best_value == reference.best_value
    best = tune.best_trials(study, k=3)
    assert [t.value for t in best] == sorted(t.value for t in study.trials)[:3]


def test_a_study_continues_to_the_budget_in_its_storage(tmp_path):
    url = tune.sqlite_url(tmp_path / "study.db")
    first = tune.run(quadratic, SPACE, config=Config(), n_trials=3, sampler="random", seed=0, storage=url,
                     study_name="s", directions="minimize")
    done = [(t.number, t.params, t.value) for t in first.trials]
    again = tune.run(quadratic, SPACE, config=Config(), n_trials=5, sampler="random", seed=1, storage=url,
                     study_name="s", directions="minimize")
    loaded = optuna.load_study(study_name="s", storage=url)  # plain Optuna opens it
    assert len(loaded.trials) == len(again.trials) == 5
    assert [(t.number, t.params, t.value) for t in loaded.trials[:3]] == done
    # Asking again for 5 runs nothing more.
    tune.run(quadratic, SPACE, config=Config(), n_trials=5, storage=url, study_name="s", directions="minimize")
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 5
    with pytest.raises(ValueError, match=r"the study 's' in sqlite:.* has directions \['minimize'\], "
                                         r"got \['maximize'\]"):
        tune.run(quadratic, SPACE, config=Config(), n_trials=6, storage=url, study_name="s")


def test_pruned_trials_are_recorded_and_count_toward_the_budget():
    def objective(config: Config, trial: optuna.trial.Trial) -> float:
        for step in range(5):
            trial.report(config.x * (step + 1), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return config.x

    study = tune.run(objective, ["x=uniform(0,1)"], config=Config(), n_trials=12, sampler="random", seed=0,
                     pruner="median", directions="minimize")
    states = [t.state for t in study.trials]
    assert len(states) == 12 and optuna.trial.TrialState.PRUNED in states
    assert all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states)


def _grid_worker(url: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune.run(quadratic, ["n=int(1,4)", "kind=choice(a,b)"], config=Config(), n_trials=6, sampler="grid",
             storage=url, study_name="shared", directions="minimize")


def test_two_processes_share_one_postgres_study_without_repeating_a_grid_point(postgres_url):
    url = postgres_url
    tune.run(quadratic, ["n=int(1,4)", "kind=choice(a,b)"], config=Config(), n_trials=1, sampler="grid",
             storage=url, study_name="shared", directions="minimize")  # create it before the race
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_grid_worker, args=(url,)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    trials = optuna.load_study(study_name="shared", storage=url).trials
    finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 6
    points = [(t.params["n"], t.params["kind"]) for t in finished]
    assert len(set(points)) == 6


def test_run_errors_name_the_argument():
    with pytest.raises(ValueError, match="tune: n_trials must be a positive int, got 0"):
        tune.run(quadratic, SPACE, config=Config(), n_trials=0)
    with pytest.raises(ValueError, match=r"tune: each direction must be one of \('maximize', 'minimize'\), got \['up'\]"):
        tune.run(quadratic, SPACE, config=Config(), n_trials=1, directions="up")
    with pytest.raises(ValueError, match="tune: the nsga2 sampler searches two or more metrics"):
        tune.run(quadratic, SPACE, config=Config(), n_trials=1, sampler="nsga2")
    with pytest.raises(ValueError, match="tune: Optuna prunes single-metric studies only"):
        tune.run(lambda c: (1.0, 2.0), SPACE, config=Config(), n_trials=1, sampler="nsga2", pruner="median",
                 directions=["maximize", "minimize"])
    with pytest.raises(ValueError, match=r"tune: the objective must return 1 number\(s\), got 'x'"):
        tune.run(lambda c: "x", SPACE, config=Config(), n_trials=1)
    assert os.path.basename(tune.sqlite_url("a/b.db")) == "b.db"
    with pytest.raises(ValueError, match="give --metric, a validation metric of the recipe"):
        tune.run("digits", ["learning_rate=uniform(1e-3,1e-2)"], n_trials=1)
    with pytest.raises(ValueError, match="tune: metric= and out= are for a recipe"):
        tune.run(quadratic, SPACE, config=Config(), n_trials=1, metric="x")
    with pytest.raises(ValueError, match="tune: give config=, the config dataclass the space is searched over"):
        tune.run(quadratic, SPACE, n_trials=1)


_KILLABLE = """
import dataclasses, sys, time
import optuna
from lepton_jax import tune

@dataclasses.dataclass(frozen=True)
class Config:
    x: float = 0.0

def objective(config, trial):
    if trial.number == 1:
        print("running", flush=True)
        time.sleep(600)  # killed here
    return config.x

optuna.logging.set_verbosity(optuna.logging.WARNING)
tune.run(objective, ["x=uniform(0,1)"], config=Config(), n_trials=3, sampler="random", seed=0,
         storage=sys.argv[1], study_name="k")
"""


@pytest.mark.slow
def test_sigkill_midtrial_then_rerun_finishes_the_budget(tmp_path, subprocess_env):
    url = tune.sqlite_url(tmp_path / "k.db")
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    process = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, text=True,
                               env=subprocess_env)
    assert process.stdout.readline().strip() == "running"
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    before = optuna.load_study(study_name="k", storage=url).trials
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    # The killed trial beat before its objective ran: without a beat it would
    # never be marked stale, and the rerun below would wait for it forever.
    with contextlib.closing(sqlite3.connect(tmp_path / "k.db")) as db:
        beating = {n for (n,) in db.execute("SELECT number FROM trials JOIN trial_heartbeats USING (trial_id)")}
    assert 1 in beating, beating

    def objective(config):
        return config.x

    study = tune.run(objective, ["x=uniform(0,1)"], config=Config(), n_trials=3, sampler="random", seed=0,
                     storage=url, study_name="k")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 3 and states[1] == "FAIL"  # the killed trial, marked failed by heartbeat
    assert (study.trials[0].params, study.trials[0].value) == (before[0].params, before[0].value)  # not re-run


def test_nsga2_pareto_front_equals_optuna_and_is_written(tmp_path, capsys):
    def two(config: Config):
        return config.x, (config.x - 1) ** 2 + config.n

    study = tune.run(two, ["x=uniform(-1,2)", "n=int(0,3)"], config=Config(), n_trials=16, sampler="nsga2",
                     seed=0, directions=["maximize", "minimize"])
    reference = optuna.create_study(sampler=optuna.samplers.NSGAIISampler(seed=0),
                                    directions=["maximize", "minimize"])
    reference.optimize(lambda t: two(Config(x=t.suggest_float("x", -1, 2), n=t.suggest_int("n", 0, 3))), n_trials=16)
    assert sorted(t.number for t in study.best_trials) == sorted(t.number for t in reference.best_trials)
    assert [t.values for t in study.trials] == [t.values for t in reference.trials]

    from lepton_jax.tune.cli import _summarize

    assert _summarize(study, ["x", "cost"], str(tmp_path), "memory") == 0
    front = json.loads((tmp_path / "pareto.json").read_text())
    assert sorted(p["trial"] for p in front) == sorted(t.number for t in reference.best_trials)
    assert all(set(p["values"]) == {"x", "cost"} for p in front)
    assert (tmp_path / "pareto_front.png").exists() and "Pareto front:" in capsys.readouterr().out


@pytest.mark.parametrize("name, reference", [
    ("gp", lambda: optuna.samplers.GPSampler(seed=4)),
    ("cmaes", lambda: optuna.samplers.CmaEsSampler(seed=4, warn_independent_sampling=False)),
    ("random", lambda: optuna.samplers.RandomSampler(seed=4)),
])
def test_each_sampler_is_optunas(name, reference):
    def objective(config: Config) -> float:
        return (config.x - 0.3) ** 2

    study = tune.run(objective, ["x=uniform(-1,1)"], config=Config(), n_trials=8, sampler=name, seed=4,
                     directions="minimize")
    expected = optuna.create_study(sampler=reference(), direction="minimize")
    expected.optimize(lambda t: objective(Config(x=t.suggest_float("x", -1, 1))), n_trials=8)
    assert [t.params for t in study.trials] == [t.params for t in expected.trials]
