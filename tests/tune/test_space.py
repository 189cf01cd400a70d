"""--space strings -> Optuna distributions, checked against the config's fields."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from lepton_jax import tune


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 8


@dataclasses.dataclass(frozen=True)
class Config:
    learning_rate: float = 1e-3
    epochs: int = 10
    hidden: str = "64"
    model: str = "mlp"
    resume: bool = False
    inner: Inner = Inner()


D = optuna.distributions


def test_every_kind_parses_to_the_optuna_distribution():
    space = tune.parse_space([
        "learning_rate=loguniform(1e-4,1e-1)", "epochs=int(10,60)", "hidden=choice(16,32,64)",
        "model=choice(mlp, 'cnn')", "resume=choice(true,false)", "inner.width=int(4,64,log)",
    ], Config())
    assert space == {
        "learning_rate": D.FloatDistribution(1e-4, 1e-1, log=True),
        "epochs": D.IntDistribution(10, 60),
        "hidden": D.CategoricalDistribution([16, 32, 64]),
        "model": D.CategoricalDistribution(["mlp", "cnn"]),
        "resume": D.CategoricalDistribution([True, False]),
        "inner.width": D.IntDistribution(4, 64, log=True),
    }
    assert tune.parse_space(["learning_rate=uniform(0,1e-3)"], Config())["learning_rate"] == D.FloatDistribution(0, 1e-3)
    assert tune.parse_space(["learning_rate=float(1e-5,1,log)"], Config())["learning_rate"] == \
        D.FloatDistribution(1e-5, 1, log=True)


def test_apply_params_sets_fields_with_their_types():
    config = tune.apply_params(Config(), {"hidden": 32, "learning_rate": 1, "inner.width": 16, "model": "cnn"})
    assert config == Config(hidden="32", learning_rate=1.0, inner=Inner(16), model="cnn")
    assert isinstance(config.learning_rate, float)


@pytest.mark.parametrize("spec, message", [
    ("lr=loguniform(1e-4,1e-1)", r"--space lr: unknown config field 'lr'; known fields: \['learning_rate'"),
    ("learning_rate=normal(0,1)", r"--space learning_rate: unknown distribution 'normal'"),
    ("learning_rate=loguniform(0,1)", r"--space learning_rate: a log scale needs low > 0, got low=0"),
    ("learning_rate=uniform(1,0.5)", r"--space learning_rate: uniform\(\) needs finite low < high, got low=1, high=0.5"),
    ("learning_rate=uniform(1)", r"--space learning_rate: uniform\(\) takes \(low, high\), got 1 arguments"),
    ("learning_rate=uniform(a,1)", r"--space learning_rate: expected a number, got 'a'"),
    ("epochs=uniform(1,5)", r"--space epochs: epochs is an int field \(10\); use int\(1,5\)"),
    ("epochs=int(1.5,5)", r"--space epochs: int\(\) takes integer bounds, got low=1.5, high=5"),
    ("learning_rate=int(1,5)", r"--space learning_rate: int\(\) searches an int field; learning_rate is float"),
    ("model=uniform(0,1)", r"--space model: uniform\(\) searches a number; model is str \('mlp'\)"),
    ("epochs=choice(10,x)", r"--space epochs: choice value 'x' does not suit the field, which holds int \(10\)"),
    ("epochs=choice(1,1)", r"--space epochs: choice\(\) lists a value twice"),
    ("epochs=int(1,5,linear)", r"--space epochs: the third argument of int\(\) can only be 'log', got 'linear'"),
    ("epochs:int(1,5)", r"--space: expected NAME=KIND\(ARGS\)"),
])
def test_bad_specs_name_the_field_and_what_was_received(spec, message):
    with pytest.raises(ValueError, match=message):
        tune.parse_space([spec], Config())


def test_a_field_given_twice_and_grid_needs_discrete_fields():
    with pytest.raises(ValueError, match="--space epochs: the field is given twice"):
        tune.parse_space(["epochs=int(1,5)", "epochs=int(2,6)"], Config())
    space = tune.parse_space(["epochs=int(1,3)", "model=choice(mlp,cnn)"], Config())
    assert tune.grid(space) == {"epochs": [1, 2, 3], "model": ["mlp", "cnn"]}
    with pytest.raises(ValueError, match=r"--space learning_rate: the grid sampler needs choice\(...\) or int\(a,b\) "
                                         r"for every field; learning_rate is FloatDistribution\(0.0001, 0.1, log\)"):
        tune.grid(tune.parse_space(["learning_rate=loguniform(1e-4,1e-1)"], Config()))
