"""``lepton-jax tune RECIPE``: a study over a registered recipe's config.

    lepton-jax tune digits --model=mlp --epochs=20 \\
        --space "learning_rate=loguniform(1e-4,1e-1)" --space "hidden=choice(16,32,64)" \\
        --trials 30 --sampler tpe --pruner median --metric accuracy --direction maximize

Each trial trains the recipe with the sampled fields in ``--out/trials/NNNN``
and is scored on the recipe's validation split. The study lives in
``--storage`` (default: ``--out/study.db``, SQLite), so running the same
command again continues it until ``--trials`` trials have finished, and
several processes given one ``postgresql://`` storage share the work.
Writes ``best.json`` (ready for ``lepton-jax train RECIPE --config best.json``),
PNG plots and, for several metrics, ``pareto.json``; keeps the best trial's
checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import warnings
from typing import Any, Sequence

import optuna

from lepton_jax import config as config_lib
from lepton_jax import registry
from lepton_jax.tune import space as space_lib
from lepton_jax.tune import study as study_lib
from lepton_jax.tune.recipes import RecipeObjective


class TuneError(ValueError):
    """A usage error, printed as one line."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-jax tune", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="a registered recipe (lepton-jax train --list)")
    parser.add_argument("--space", action="append", default=[], metavar="FIELD=KIND(ARGS)",
                        help="a searched config field: uniform/loguniform/float(a,b[,log]), int(a,b[,log]), choice(...)")
    parser.add_argument("--trials", type=int, default=20, help="finished trials the study should hold")
    parser.add_argument("--sampler", choices=study_lib.SAMPLERS, default="tpe")
    parser.add_argument("--pruner", choices=study_lib.PRUNERS, default="none")
    parser.add_argument("--metric", action="append", default=[],
                        help="a validation metric of the recipe (e.g. accuracy, loss, bits_per_byte) or 'params'; "
                             "twice for nsga2")
    parser.add_argument("--direction", action="append", default=[], choices=study_lib.DIRECTIONS,
                        help="one per --metric (default maximize)")
    parser.add_argument("--storage", default=None, help="an RDB URL (default: sqlite in --out/study.db)")
    parser.add_argument("--study", default=None, help="the study's name (default: the recipe's)")
    parser.add_argument("--out", default=None, help="output folder (default: runs/tune/RECIPE)")
    parser.add_argument("--population", type=int, default=1, metavar="K",
                        help="train up to K like trials (differing in the recipe's population fields, e.g. the "
                             "learning rate) as one vmapped program")
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="a progress bar over trials")
    return parser


def _format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _overrides(params: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)
    return " ".join(f"--{k}={text(v)}" for k, v in params.items())


def _plots(study: optuna.Study, out: str, metrics: Sequence[str]) -> list[str]:
    """Optuna's matplotlib plots as PNGs; a plot the study cannot make yet is skipped.
    A multi-metric study plots its first metric's importances and coordinates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    written = []
    if len(study.directions) == 1:
        plots = {"optimization_history": (ovm.plot_optimization_history, {}),
                 "parallel_coordinates": (ovm.plot_parallel_coordinate, {}),
                 "param_importances": (ovm.plot_param_importances, {})}
    else:
        first = study.directions[0] == optuna.study.StudyDirection.MINIMIZE
        plots = {"pareto_front": (ovm.plot_pareto_front, {"target_names": list(metrics)}),
                 "parallel_coordinates": (ovm.plot_parallel_coordinate,
                                          {"target": lambda t: t.values[0], "target_name": metrics[0]}),
                 # the importance evaluator ranks for low values: a maximized metric is negated
                 "param_importances": (ovm.plot_param_importances,
                                       {"target": (lambda t: t.values[0]) if first else (lambda t: -t.values[0]),
                                        "target_name": metrics[0]})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")  # negated above
        for name, (plot, kwargs) in plots.items():
            try:
                axes = plot(study, **kwargs)
            except (ValueError, RuntimeError) as error:  # e.g. importances need two finished trials
                print(f"tune: no {name} plot: {error}")
                continue
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            path = os.path.join(out, f"{name}.png")
            figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(figure)
            written.append(path)
    return written


def _keep_best_checkpoints(study: optuna.Study) -> None:
    """Deletes the checkpoints of every finished trial but the best one."""
    best = {t.number for t in study_lib.best_trials(study, k=1)}
    for trial in study.get_trials(deepcopy=False, states=study_lib.FINISHED):
        directory = trial.user_attrs.get("out")
        if directory and trial.number not in best:
            shutil.rmtree(os.path.join(directory, "checkpoints"), ignore_errors=True)


def tune(argv: Sequence[str]) -> int:
    """Runs ``lepton-jax tune`` with ``argv``; returns the exit status."""
    args, overrides = _parser().parse_known_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial is printed here instead
    recipe = registry.get(args.recipe)
    out = os.path.abspath(args.out or os.path.join("runs", "tune", args.recipe))
    if recipe.run is None or recipe.config is None:
        raise TuneError(f"recipe {args.recipe!r} does not support tuning (its Recipe has no config/run)")
    base = config_lib.override(recipe.config, overrides)
    space = space_lib.parse_space(args.space, base)
    metrics = args.metric or []
    objective = RecipeObjective(recipe, metrics, out, prune=args.pruner != "none")
    directions = args.direction or ["maximize"] * len(metrics)
    if len(directions) != len(metrics):
        raise TuneError(f"give one --direction per --metric: {len(metrics)} metrics, {len(directions)} directions")
    if args.trials < 1:
        raise TuneError(f"--trials must be a positive int, got {args.trials}")
    storage = args.storage or study_lib.sqlite_url(os.path.join(out, "study.db"))
    study_name = args.study or args.recipe
    os.makedirs(out, exist_ok=True)
    if args.sampler == "grid":
        space_lib.grid(space)  # a float range has no grid: fail before any trial
    if args.population < 1:
        raise TuneError(f"--population must be a positive int, got {args.population}")
    if args.population > 1 and recipe.population is None:
        raise TuneError(f"recipe {args.recipe!r} cannot train a population (its Recipe has no population)")

    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.trials, desc=f"tune {study_name}", unit="trial")

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state not in study_lib.FINISHED:
            return
        values = trial.values if trial.values is not None else [trial.intermediate_values.get(
            max(trial.intermediate_values, default=0), math.nan)]
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else math.nan
        scores = ", ".join(f"{m}={v:.4g}" for m, v in zip(metrics, values))
        line = f"trial {trial.number} {trial.state.name.lower()}: {scores} | {_format_params(trial.params)} ({seconds:.1f}s)"
        (bar.write if bar is not None else print)(line)
        if bar is not None:
            bar.update(1)
        if len(study.directions) == 1:
            _keep_best_checkpoints(study)

    before = 0
    try:
        existing = optuna.load_study(study_name=study_name, storage=storage)
        before = sum(t.state in study_lib.FINISHED for t in existing.get_trials(deepcopy=False))
    except KeyError:
        pass
    if bar is not None:
        bar.update(min(before, args.trials))
    population = args.population > 1
    study = study_lib.run(objective.population if population else objective, space, config=base,
                          n_trials=args.trials, sampler=args.sampler, pruner=args.pruner, storage=storage,
                          study_name=study_name, directions=directions, seed=args.seed, callbacks=[report],
                          population=args.population,
                          population_fields=recipe.population_fields if population else None)
    if bar is not None:
        bar.close()
    return _summarize(study, metrics, out, storage)


def _summarize(study: optuna.Study, metrics: list[str], out: str, storage: str) -> int:
    best = study_lib.best_trials(study, k=5)
    if not best:
        print(f"tune: no trial of study {study.study_name!r} completed; see {storage}")
        return 1
    counts = {s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False))
              for s in optuna.trial.TrialState}
    print(f"\nstudy {study.study_name!r} in {storage}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n))
    header = f"{'trial':>5}  " + "  ".join(f"{m:>12}" for m in metrics) + "  params"
    print(("Pareto front:" if len(study.directions) > 1 else "best trials:") + "\n" + header)
    for trial in best:
        print(f"{trial.number:>5}  " + "  ".join(f"{v:>12.5g}" for v in trial.values) + f"  {_format_params(trial.params)}")
    top = best[0]
    best_json = {
        "value": top.values[0] if len(top.values) == 1 else list(top.values),
        "metrics": dict(zip(metrics, top.values)),
        "params": dict(top.params),
        "config": top.user_attrs.get("config"),
        "trial": top.number,
        "checkpoint": os.path.join(top.user_attrs["out"], "checkpoints") if "out" in top.user_attrs else None,
        "study": study.study_name,
        "storage": storage,
    }
    with open(os.path.join(out, "best.json"), "w", encoding="utf-8") as f:
        json.dump(best_json, f, indent=2)
    if len(study.directions) > 1:
        front = [{"trial": t.number, "values": dict(zip(metrics, t.values)), "params": t.params} for t in best]
        with open(os.path.join(out, "pareto.json"), "w", encoding="utf-8") as f:
            json.dump(front, f, indent=2)
    plots = _plots(study, out, metrics)
    print(f"best: trial {top.number}, " + ", ".join(f"{m}={v:.5g}" for m, v in zip(metrics, top.values)))
    print(f"as overrides: {_overrides(dict(top.params))}")
    print(f"wrote {os.path.join(out, 'best.json')}" + (f" and {len(plots)} plots" if plots else ""))
    return 0
