"""lepton-jax tune on the digits recipe: trials on the validation split, the
study in SQLite, best.json that `lepton-jax train --config` reproduces."""

from __future__ import annotations

import json
import os

import optuna
import pytest

from lepton_jax import cli

FAST = ["--model=mlp", "--epochs=2", "--eval_every_epochs=1", "--hidden=16"]


def test_bad_arguments_fail_in_one_line_before_any_trial(tmp_path, capsys):
    out = tmp_path / "t"
    cases = [
        (["--space", "lr=loguniform(1e-4,1e-1)"], "lepton-jax tune: --space lr: unknown config field 'lr'"),
        (["--space", "epochs=uniform(1,5)"], "lepton-jax tune: --space epochs: epochs is an int field"),
        (["--space", "learning_rate=loguniform(1e-4,1e-1)"], "lepton-jax tune: give --metric"),
        (["--space", "learning_rate=loguniform(1e-4,1e-1)", "--metric", "accuracy", "--sampler", "grid"],
         "lepton-jax tune: --space learning_rate: the grid sampler needs choice(...)"),
        (["--space", "epochs=int(1,2)", "--nope=1"], "lepton-jax tune: override: unknown config field 'nope'"),
    ]
    for args, message in cases:
        assert cli.main(["tune", "digits", *args, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert not (out / "trials").exists()


@pytest.mark.slow
def test_tune_digits_writes_best_json_that_train_reproduces(tmp_path, capsys):
    out = tmp_path / "tune"
    args = ["tune", "digits", *FAST, "--space", "learning_rate=loguniform(1e-3,3e-2)", "--trials", "2",
            "--metric", "accuracy", "--pruner", "median", "--out", str(out), "--no-progress", "--seed", "1"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "trial 0 complete: accuracy=" in printed and "trial 1 complete" in printed
    best = json.loads((out / "best.json").read_text())
    study = optuna.load_study(study_name="digits", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 2 and best["value"] == study.best_value and best["params"] == study.best_params
    trial_dir = out / "trials" / f"{study.best_trial.number:04d}"
    results = json.loads((trial_dir / "results.json").read_text())
    assert best["value"] == results["val_metrics"]["accuracy"] == results["val_accuracy"]  # validation, not test
    assert best["config"]["learning_rate"] == best["params"]["learning_rate"] and best["config"]["model"] == "mlp"
    assert os.path.isdir(best["checkpoint"]) and best["checkpoint"].startswith(str(trial_dir))
    other = out / "trials" / f"{1 - study.best_trial.number:04d}"
    assert (other / "results.json").exists() and not (other / "checkpoints").exists()  # only the best kept
    assert {p.name for p in out.glob("*.png")} >= {"optimization_history.png", "parallel_coordinates.png"}
    # Running it again continues the study: nothing re-runs.
    assert cli.main(args) == 0
    assert len(optuna.load_study(study_name="digits", storage=f"sqlite:///{out / 'study.db'}").trials) == 2
    # The winning config trains to the same validation accuracy.
    assert cli.main(["train", "digits", "--config", str(out / "best.json"), f"--out={tmp_path / 'again'}",
                     "--progress=false"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["val_accuracy"] == best["value"] and again["config"]["learning_rate"] == best["params"]["learning_rate"]
