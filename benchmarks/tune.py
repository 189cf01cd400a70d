"""Hyper-parameter search on the digits MLP: populations and samplers.

    python -m benchmarks.tune population    # (a) 16 trials as one population vs one at a time
    python -m benchmarks.tune samplers      # (b) TPE, GP, CMA-ES vs random: 30 trials, 3 seeds
    python -m benchmarks.tune samplers --seeds 0 --trials 6 --epochs 5 --out /tmp/s.json   # a quick check

(a) runs ``lepton-jax tune digits --model=mlp`` twice in fresh processes,
the same 16 random-sampler trials (learning rate and weight decay searched),
with ``--population 16`` and with ``--population 1``, and reports the wall
times and their ratio.

(b) runs a 30-trial study per sampler and seed over the learning rate, the
weight decay, the label smoothing and the hidden width, each trial scored on
the validation split, and reports the best validation accuracy and the test
accuracy of that winner, per seed and the mean. JSON to
``benchmarks/results/tune_<what>_<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import optuna

from benchmarks import write_result
from lepton_jax import tune
from recipes import digits

POPULATION_SPACE = ["learning_rate=loguniform(1e-4,1e-1)", "weight_decay=loguniform(1e-6,1e-2)"]
SAMPLER_SPACE = [*POPULATION_SPACE, "label_smoothing=uniform(0,0.2)", "hidden=choice(16,32,64)"]


def _machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
            "device": str(jax.devices()[0]), "optuna": optuna.__version__}


def population(args: argparse.Namespace) -> dict:
    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for k in (args.population, 1):
            out = os.path.join(root, f"population{k}")
            command = [sys.executable, "-m", "lepton_jax.cli", "tune", "digits", "--model=mlp",
                       f"--epochs={args.epochs}", *(f"--space={s}" for s in POPULATION_SPACE),
                       "--trials", str(args.trials), "--population", str(k), "--sampler", "random", "--seed", "0",
                       "--metric", "accuracy", "--out", out, "--no-progress"]
            started = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds = time.perf_counter() - started
            with open(os.path.join(out, "best.json"), encoding="utf-8") as f:
                best = json.load(f)
            runs[k] = {"population": k, "wall_seconds": round(seconds, 2), "best_val_accuracy": best["value"],
                       "best_params": best["params"]}
            print(f"--population {k}: {args.trials} trials in {seconds:.1f} s, best val accuracy {best['value']:.4f}")
    speedup = runs[1]["wall_seconds"] / runs[args.population]["wall_seconds"]
    print(f"speedup of one {args.population}-member population over one trial at a time: {speedup:.2f}x")
    return {"what": "population", "trials": args.trials, "epochs": args.epochs, "space": POPULATION_SPACE,
            "runs": list(runs.values()), "speedup": round(speedup, 2)}


def samplers(args: argparse.Namespace) -> dict:
    base = digits.DigitsConfig(model="mlp", epochs=args.epochs, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for sampler in args.samplers.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                def objective(config, trial, sampler=sampler, seed=seed):
                    out = os.path.join(root, f"{sampler}{seed}", f"{trial.number:03d}")
                    with contextlib.redirect_stdout(io.StringIO()):
                        results = digits.run(dataclasses.replace(config, out=out))
                    trial.set_user_attr("test_accuracy", results["test_accuracy"])
                    return results["val_metrics"]["accuracy"]

                started = time.perf_counter()
                study = tune.run(objective, SAMPLER_SPACE, config=base, n_trials=args.trials, sampler=sampler,
                                 seed=seed, directions="maximize")
                best = study.best_trial
                row = {"sampler": sampler, "seed": seed, "best_val_accuracy": best.value,
                       "winner_test_accuracy": best.user_attrs["test_accuracy"], "best_params": best.params,
                       "seconds": round(time.perf_counter() - started, 1)}
                rows.append(row)
                print(f"{sampler:7s} seed {seed}: best val {best.value:.4f}, its test {row['winner_test_accuracy']:.4f} "
                      f"({row['seconds']:.0f} s)", flush=True)
    means = {}
    for sampler in args.samplers.split(","):
        mine = [r for r in rows if r["sampler"] == sampler]
        means[sampler] = {"mean_best_val_accuracy": statistics.mean(r["best_val_accuracy"] for r in mine),
                          "mean_winner_test_accuracy": statistics.mean(r["winner_test_accuracy"] for r in mine)}
        print(f"{sampler:7s} mean best val {means[sampler]['mean_best_val_accuracy']:.4f}, "
              f"mean winner test {means[sampler]['mean_winner_test_accuracy']:.4f}")
    return {"what": "samplers", "trials": args.trials, "epochs": args.epochs, "space": SAMPLER_SPACE,
            "runs": rows, "means": means}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("population", "samplers"))
    parser.add_argument("--trials", type=int, default=None, help="default: 16 (population), 30 (samplers)")
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40, help="the MLP's epochs per trial")
    parser.add_argument("--samplers", default="random,tpe,gp,cmaes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.trials = args.trials or (16 if args.what == "population" else 30)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result = {**(population(args) if args.what == "population" else samplers(args)), "machine": _machine(),
              "date": datetime.date.today().isoformat()}
    out = args.out or os.path.join("benchmarks", "results", f"tune_{args.what}_{result['date']}.json")
    write_result(result, out)
    return result


if __name__ == "__main__":
    main()
