"""Population trials: K configs trained as one vmapped program equal each
config trained alone; tune.run groups like trials and reports each one."""

from __future__ import annotations

import dataclasses
import threading

import jax
import numpy as np
import optuna
import pytest

from lepton_jax import checkpoint, tune

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.slow
def test_digits_population_members_equal_their_runs_alone(tmp_path):
    from recipes import digits

    base = digits.DigitsConfig(model="mlp", hidden="16", epochs=2, eval_every_epochs=1, progress=False)
    configs = [dataclasses.replace(base, learning_rate=3e-3, weight_decay=1e-4, seed=0, out=str(tmp_path / "p0")),
               dataclasses.replace(base, learning_rate=2e-2, weight_decay=1e-2, seed=1, out=str(tmp_path / "p1"))]
    reports = []
    results = digits.run_population(configs, lambda k, step, val: reports.append((k, step, val["accuracy"])))
    steps_per_epoch = results[0]["steps"] // 2
    assert sorted({(k, step) for k, step, _ in reports}) == [(k, s) for k in (0, 1)
                                                             for s in (steps_per_epoch, 2 * steps_per_epoch)]
    for k, config in enumerate(configs):
        alone = digits.run(dataclasses.replace(config, out=str(tmp_path / f"alone{k}")))
        assert results[k]["val_accuracy"] == alone["val_accuracy"]
        assert results[k]["test_accuracy"] == alone["test_accuracy"]
        member = checkpoint.restore(str(tmp_path / f"p{k}" / "checkpoints"), params_only=True)
        reference = checkpoint.restore(str(tmp_path / f"alone{k}" / "checkpoints"), params_only=True)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), member, reference)
    assert results[0]["val_accuracy"] != results[1]["val_accuracy"]  # the members did differ
    with pytest.raises(ValueError, match=r"digits: a population's configs may differ only in .*; "
                                         r"they differ in \['hidden'\]"):
        digits.run_population([configs[0], dataclasses.replace(configs[1], hidden="32")])


@dataclasses.dataclass(frozen=True)
class Config:
    rate: float = 0.1
    width: int = 1


def test_tune_run_groups_like_trials_into_populations():
    calls = []
    lock = threading.Lock()

    def objective(configs, trials):
        with lock:
            calls.append([(c.width, t.number) for c, t in zip(configs, trials)])
        assert len({c.width for c in configs}) == 1  # one structure per program
        return [-(c.rate - 0.3) ** 2 - c.width for c in configs]

    study = tune.run(objective, ["rate=uniform(0,1)", "width=choice(1,2)"], config=Config(), n_trials=10,
                     sampler="random", seed=0, population=4)
    trials = study.trials
    assert len(trials) == 10 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)  # no extra trial
    assert sorted(n for call in calls for _, n in call) == list(range(10))  # each trial ran once
    assert max(len(call) for call in calls) > 1  # some ran together
    for t in trials:
        assert t.value == pytest.approx(-(t.params["rate"] - 0.3) ** 2 - t.params["width"])


def test_population_members_can_be_pruned_and_errors_fail_the_group():
    def objective(configs, trials):
        return [optuna.TrialPruned("too slow") if c.rate > 0.5 else c.rate for c in configs]

    study = tune.run(objective, ["rate=uniform(0,1)"], config=Config(), n_trials=6, sampler="random", seed=1,
                     population=3)
    for t in study.trials:
        assert t.state == (optuna.trial.TrialState.PRUNED if t.params["rate"] > 0.5 else
                           optuna.trial.TrialState.COMPLETE)

    def broken(configs, trials):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        tune.run(broken, ["rate=uniform(0,1)"], config=Config(), n_trials=2, population=2)
    with pytest.raises(ValueError, match="tune: population must be a positive int, got 0"):
        tune.run(broken, ["rate=uniform(0,1)"], config=Config(), n_trials=2, population=0)
