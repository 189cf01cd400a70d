"""Frozen-dataclass configs overridden from the command line by field name.

``override(config, ["--lr=0.1", "--model.width", "256", "--resume"])`` returns
a new config; nested dataclass fields are reached with dots. Values are parsed
by the field's current type (bool, int, float, str, tuples of those).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def override(config: Any, argv: Sequence[str]) -> Any:
    """Returns ``config`` with the ``--name[=value]`` overrides of ``argv`` applied.

    A bool field given without a value is set to True; dashes in a name read
    as underscores (``--batch-size``). Unknown names raise ``ValueError``
    listing the known ones.

    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class Run:
    ...     lr: float = 0.1
    ...     steps: int = 10
    ...     resume: bool = False
    >>> override(Run(), ["--lr=0.5", "--steps", "20", "--resume"])
    Run(lr=0.5, steps=20, resume=True)
    """
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"override: config must be a dataclass instance, got {type(config).__name__}")
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ValueError(f"override: expected --name[=value], got {arg!r}")
        name, has_value, value = arg[2:].partition("=")
        name = name.replace("-", "_")  # --batch-size as --batch_size: field names never hold dashes
        current = get_field(config, name)
        if not has_value:
            next_is_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            if isinstance(current, bool) and not next_is_value:
                value = "true"
            elif next_is_value:
                i += 1
                value = args[i]
            else:
                raise ValueError(f"override: --{name} needs a value")
        config = set_field(config, name, _parse(value, current, name))
        i += 1
    return config


def print_help(argv: Sequence[str], doc: str | None, config: Any) -> bool:
    """When ``argv`` asks for help (``-h``/``--help``): prints ``doc`` and every
    field of ``config`` with its default, and returns True."""
    if not any(a in ("-h", "--help") for a in argv):
        return False
    print(doc or "")
    print("Fields:", ", ".join(f"--{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)))
    return True


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a (nested) dataclass config."""
    return dataclasses.asdict(config)


def to_overrides(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``--name=value`` strings that ``override`` reads back as ``values``
    (a dict from ``to_dict``; nested dicts become dotted names).

    >>> to_overrides({"lr": 0.5, "resume": True, "sizes": (64, 32), "model": {"width": 8}})
    ['--lr=0.5', '--resume=true', '--sizes=64,32', '--model.width=8']
    """
    args = []
    for name, value in values.items():
        if isinstance(value, Mapping):
            args += to_overrides(value, f"{prefix}{name}.")
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = "none" if value is None else str(value)
        args.append(f"--{prefix}{name}={text}")
    return args


def get_field(config: Any, dotted: str, *, where: str = "override") -> Any:
    """The value of field ``dotted`` (``"model.width"``) of a (nested) dataclass
    config; an unknown name raises ``ValueError`` prefixed with ``where``,
    listing the known ones."""
    node = config
    for part in dotted.split("."):
        names = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
        if part not in names:
            raise ValueError(f"{where}: unknown config field {dotted!r}; known fields: {names}")
        node = getattr(node, part)
    return node


def set_field(config: Any, dotted: str, value: Any) -> Any:
    """``config`` with field ``dotted`` set to ``value`` (a new frozen dataclass)."""
    head, _, rest = dotted.partition(".")
    if rest:
        value = set_field(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: value})


def _parse(text: str, current: Any, name: str) -> Any:
    try:
        if isinstance(current, bool):
            lowered = text.lower()
            if lowered not in _TRUE | _FALSE:
                raise ValueError(text)
            return lowered in _TRUE
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, tuple):
            items = [t for t in text.strip("()[] ").split(",") if t.strip()]
            kind = type(current[0]) if current else str
            return tuple(_parse(t.strip(), kind(), name) if kind is not str else t.strip() for t in items)
        if current is None:
            return None if text.lower() == "none" else _guess(text)
        return text
    except ValueError:
        raise ValueError(
            f"override: --{name} expects a {type(current).__name__}, got {text!r}"
        ) from None


def _guess(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text
