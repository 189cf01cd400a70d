"""Search spaces over a recipe's config dataclass, as Optuna distributions.

One ``--space`` string per searched field::

    learning_rate=loguniform(1e-4,1e-1)   weight_decay=uniform(0,1e-3)
    dropout=float(0,0.5)                  width=float(16,256,log)
    epochs=int(10,60)                     batch_size=int(16,256,log)
    hidden=choice(16,32,64)               model=choice(mlp,cnn)

``parse_space`` checks every field against the config (the field exists, the
distribution suits its type, the bounds make sense) before any trial runs,
and raises ``ValueError`` naming the field and what it received.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

import optuna

from lepton_jax import config as config_lib

Distribution = optuna.distributions.BaseDistribution

_SPEC = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=\s*([a-z]+)\s*\((.*)\)\s*$", re.S)
_KINDS = ("uniform", "loguniform", "float", "int", "choice")


def _number(field: str, text: str) -> float | int:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"--space {field}: expected a number, got {text.strip()!r}")
    return value


def _choice_value(text: str) -> Any:
    """A literal (number, quoted string, True/False/None) or a bare word as a string."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_distribution(spec: str, config: Any) -> tuple[str, Distribution]:
    """``"name=kind(args)"`` -> ``(name, optuna distribution)``, checked against ``config``'s field."""
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"--space: expected NAME=KIND(ARGS) with KIND one of {_KINDS}, got {spec!r}")
    field, kind, args_text = match.groups()
    current = config_lib.get_field(config, field, where=f"--space {field}")
    args = [a for a in (s.strip() for s in args_text.split(",")) if a] if args_text.strip() else []
    if kind not in _KINDS:
        raise ValueError(f"--space {field}: unknown distribution {kind!r}; use one of {_KINDS}")
    if kind == "choice":
        if not args:
            raise ValueError(f"--space {field}: choice() needs at least one value, got {spec!r}")
        values = [_choice_value(a) for a in args]
        if len(set(map(repr, values))) != len(values):
            raise ValueError(f"--space {field}: choice() lists a value twice, got {values}")
        for value in values:
            _check_type(field, current, value)
        return field, optuna.distributions.CategoricalDistribution(values)
    log = kind == "loguniform"
    if kind in ("float", "int") and len(args) == 3:
        if args[2].lower() != "log":
            raise ValueError(f"--space {field}: the third argument of {kind}() can only be 'log', got {args[2]!r}")
        log, args = True, args[:2]
    if len(args) != 2:
        raise ValueError(f"--space {field}: {kind}() takes (low, high{', log' if kind in ('float', 'int') else ''}), "
                         f"got {len(args)} arguments in {spec!r}")
    low, high = (_number(field, a) for a in args)
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"--space {field}: {kind}() needs finite low < high, got low={low}, high={high}")
    if log and low <= 0:
        raise ValueError(f"--space {field}: a log scale needs low > 0, got low={low}")
    if kind == "int":
        if not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"--space {field}: int() takes integer bounds, got low={low}, high={high}")
        if isinstance(current, bool) or not isinstance(current, int):
            raise ValueError(f"--space {field}: int() searches an int field; {field} is "
                             f"{type(current).__name__} ({current!r})")
        return field, optuna.distributions.IntDistribution(int(low), int(high), log=log)
    if isinstance(current, bool) or not isinstance(current, (int, float)):
        raise ValueError(f"--space {field}: {kind}() searches a number; {field} is "
                         f"{type(current).__name__} ({current!r}); use choice(...)")
    if isinstance(current, int):
        raise ValueError(f"--space {field}: {field} is an int field ({current!r}); use int({low},{high}"
                         f"{',log' if log else ''}) or choice(...)")
    return field, optuna.distributions.FloatDistribution(float(low), float(high), log=log)


def _check_type(field: str, current: Any, value: Any) -> None:
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(current, str):
        ok = isinstance(value, str)
        if not ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            return  # a str field holding numbers (e.g. hidden="64"): kept as written
    else:
        ok = True
    if not ok:
        raise ValueError(f"--space {field}: choice value {value!r} does not suit the field, which holds "
                         f"{type(current).__name__} ({current!r})")


def parse_space(specs: Sequence[str], config: Any) -> dict[str, Distribution]:
    """Every ``--space`` string parsed and checked against ``config``.

    Returns ``{field: distribution}`` in the order given; a field given twice
    or a spec that does not parse raises ``ValueError`` naming it.
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"parse_space: config must be a dataclass instance, got {type(config).__name__}")
    if not specs:
        raise ValueError("--space: give at least one NAME=KIND(ARGS) to search")
    space: dict[str, Distribution] = {}
    for spec in specs:
        name, distribution = parse_distribution(spec, config)
        if name in space:
            raise ValueError(f"--space {name}: the field is given twice")
        space[name] = distribution
    return space


def apply_params(config: Any, params: Mapping[str, Any]) -> Any:
    """``config`` with the trial's ``params`` set (dotted names reach nested configs)."""
    for name, value in params.items():
        current = config_lib.get_field(config, name, where=f"--space {name}")
        if isinstance(current, str) and not isinstance(value, str):
            value = str(value)
        elif isinstance(current, float) and not isinstance(current, bool):
            value = float(value)
        config = config_lib.set_field(config, name, value)
    return config


def grid(space: Mapping[str, Distribution]) -> dict[str, list[Any]]:
    """The grid sampler's values per field: ``choice`` values and every int of an
    ``int`` range; a float range has no grid and raises ``ValueError`` naming it."""
    values: dict[str, list[Any]] = {}
    for name, distribution in space.items():
        if isinstance(distribution, optuna.distributions.CategoricalDistribution):
            values[name] = list(distribution.choices)
        elif isinstance(distribution, optuna.distributions.IntDistribution) and not distribution.log:
            values[name] = list(range(distribution.low, distribution.high + 1, distribution.step))
        else:
            raise ValueError(f"--space {name}: the grid sampler needs choice(...) or int(a,b) for every field; "
                             f"{name} is {type(distribution).__name__}"
                             f"({distribution.low}, {distribution.high}{', log' if distribution.log else ''})")
    return values


__all__ = ["apply_params", "grid", "parse_distribution", "parse_space"]
