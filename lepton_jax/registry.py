"""Recipes register themselves; the library never imports one by name.

A recipe is a runnable training script that also says how its checkpoints
become an exported model. It registers a ``Recipe`` under the Python
entry-point group ``lepton_jax.recipes``, so ``lepton-jax train NAME`` and
``lepton-jax export --recipe NAME`` find it, whichever package ships it::

    # pyproject.toml of your package
    [project.entry-points."lepton_jax.recipes"]
    mine = "my_package.my_recipe:RECIPE"

Every recipe saves its config dataclass (as a dict) under
``extra["config"]`` in each checkpoint (``Checkpoint(extra={"config": ...})``).
"""

from __future__ import annotations

import dataclasses
from importlib import metadata
from typing import Any, Callable, Mapping, Sequence

import numpy as np

GROUP = "lepton_jax.recipes"


@dataclasses.dataclass(frozen=True)
class ExportParts:
    """What ``export_recipe`` needs from a recipe's checkpoint.

    Attributes:
      apply_fn: ``(variables, *inputs) -> outputs``, the function to export.
      variables: its variables (``{"params": ...}`` and any collections).
      example_inputs: one example input (its dtype and trailing shape are exported;
        the batch dimension is symbolic).
      input_names / output_names: names of the inputs and outputs.
      model: the linen model (quantization rewrites it).
      config: the recipe config, saved in the export's metadata.
      preprocessing: recorded in the export (e.g. ``{"normalize": ...}``).
      calibration: ``() -> [batches]`` of training inputs for static int8 scales.
      quantize_options: keyword arguments for ``quant.quantize``.
      decoder: also export a KV-cache decode step (``:generate``) for this
        language model, with this tokenizer name.
    """

    apply_fn: Callable[..., Any]
    variables: Any
    example_inputs: np.ndarray
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    model: Any
    config: Mapping[str, Any]
    preprocessing: Mapping[str, Any] | None = None
    calibration: Callable[[], list[np.ndarray]] | None = None
    quantize_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    decoder: str | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A registered recipe.

    Attributes:
      name: what ``lepton-jax train NAME`` calls it.
      main: ``main(argv)``, the command line (``--field=value`` overrides).
      export: ``export(manager, step, config) -> ExportParts``, where
        ``manager`` is an open ``checkpoint.CheckpointManager`` and ``config``
        the dict the checkpoint saved under ``extra["config"]``; ``None`` if
        the recipe's models cannot be exported.
      description: one line for listings.
      config: the default config (a frozen dataclass) that ``main``'s
        ``--field=value`` overrides; what ``lepton-jax tune`` searches.
      run: ``run(config, hooks) -> results``: trains with ``config``, adding
        ``hooks`` to ``fit``'s, and returns a dict with ``"val_metrics"``
        (the last evaluation on the validation split, never the test split)
        and ``"num_params"``; ``None`` if the recipe cannot be tuned.
      population: ``population(configs, report) -> [results]``: trains configs
        that differ only in ``population_fields`` as one ``vmap``-ed program
        (``lepton-jax tune --population K``), calling ``report(member, step,
        val_metrics)`` at each evaluation; ``None`` if the recipe has none.
      population_fields: the config fields a population's members may differ in.
    """

    name: str
    main: Callable[[Sequence[str] | None], Any]
    export: Callable[[Any, int, Mapping[str, Any]], ExportParts] | None = None
    description: str = ""
    config: Any = None
    run: Callable[[Any, Sequence[Any]], Mapping[str, Any]] | None = None
    population: Callable[[Sequence[Any], Callable[[int, int, Mapping[str, Any]], None] | None],
                         list[Mapping[str, Any]]] | None = None
    population_fields: tuple[str, ...] = ()


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=GROUP)}


def names() -> list[str]:
    """The registered recipes' names, sorted (nothing is imported)."""
    return sorted(_entry_points())


def get(name: str) -> Recipe:
    """The recipe registered as ``name``; a ``ValueError`` listing the others if none is."""
    points = _entry_points()
    if name not in points:
        raise ValueError(f"unknown recipe {name!r}; registered recipes ({GROUP} entry points): {sorted(points)}")
    recipe = points[name].load()
    if not isinstance(recipe, Recipe):
        raise TypeError(f"the entry point {points[name].value!r} of recipe {name!r} must be a "
                        f"lepton_jax.registry.Recipe, got {type(recipe).__name__}")
    return recipe


__all__ = ["GROUP", "ExportParts", "Recipe", "get", "names"]
