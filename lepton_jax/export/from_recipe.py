"""``export_recipe``: a recipe's checkpoint to a model directory.

The recipe scripts own their model definitions (``recipes/digits.py``
``build_model``, ``recipes/gpt.py`` ``build``); the config each checkpoint
carries in its ``extra`` JSON says how to rebuild the model. Like
``lepton-jax train``, this resolves the recipe module by name at run time,
so the library keeps no import-time dependency on ``recipes/``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from lepton_jax.export.model_dir import DEFAULT_PLATFORMS, export_model

RECIPES = ("digits", "gpt")


def export_recipe(recipe: str, ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
                  *, platforms: Sequence[str] = DEFAULT_PLATFORMS, quantize: str | None = None) -> str:
    """Exports the model a recipe trained into ``out_dir/<next version>/``.

    Args:
      recipe: ``"digits"`` (images ``float32[b, 8, 8, 1]`` in [0, 1] -> logits
        ``[b, 10]``; the training split's normalization is recorded as
        preprocessing) or ``"gpt"`` (tokens ``int32[b, seq_len]`` -> next-token
        logits ``[b, seq_len, vocab]``).
      ckpt_dir: the run's checkpoint directory, or its output directory
        holding ``checkpoints/``.
      out_dir: the model directory to add a version to.
      step: the checkpoint step; ``None``: the latest.
      platforms: as for ``export_model``.
      quantize: ``None``, ``"int8"`` (weights and activations, scales from
        training batches; digits only) or ``"int8_weight"`` (``lepton_jax.quant``).

    Returns:
      The path of the written version directory.
    """
    if recipe not in RECIPES:
        raise ValueError(f"export_recipe: recipe must be one of {RECIPES}, got {recipe!r}")
    from lepton_jax import checkpoint  # lazy: orbax is only needed here, not to load an export

    ckpt_dir = checkpoint.paths.checkpoint_dir(ckpt_dir, where="export_recipe")
    with checkpoint.CheckpointManager(ckpt_dir, async_save=False) as manager:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(f"export_recipe: no checkpoint in {ckpt_dir}")
        if step is None:
            step = steps[-1]
        elif int(step) not in steps:
            raise FileNotFoundError(f"export_recipe: no step {step} in {ckpt_dir}; steps are {steps}")
        step = int(step)
        extra = manager.extra(step)
        metrics = manager.metrics(step)
        build = {"digits": _digits, "gpt": _gpt}[recipe]
        apply_fn, variables, example, names, preprocessing, config, model, calibration = build(
            manager, step, extra, ckpt_dir)
    quantized = None
    if quantize is not None:
        quantized = _quantized(recipe, quantize, model, variables, example, calibration)
        apply_fn, variables = quantized.export_parts()
    metadata = {"recipe": recipe, "source": {"checkpoint_dir": ckpt_dir, "step": step},
                "metrics": metrics, "config": config, "quantization": quantize}
    path = export_model(out_dir, apply_fn, variables, example, input_names=names[0], output_names=names[1],
                        platforms=platforms, preprocessing=preprocessing, metadata=metadata)
    if recipe == "gpt":  # a KV-cache decode step for :generate
        from lepton_jax.export.generation import export_decoder

        if quantized is None:
            export_decoder(path, model, variables, platforms=platforms, tokenizer="bytes")
        else:  # the same int8 weights and static scales, stored flat in params.npz
            export_decoder(path, quantized.model, variables, platforms=platforms,
                           tokenizer="bytes", rebuild=quantized.flat_variables()[1])
    return path


def _import_recipe(name: str):
    try:
        return importlib.import_module(f"recipes.{name}")
    except ModuleNotFoundError as error:
        if error.name not in ("recipes", f"recipes.{name}"):
            raise
        raise ValueError(f"export_recipe: cannot import recipes.{name}; install lepton_jax with its recipes "
                         "(pip install -e .) or run from the repository root") from None


def _recipe_config(extra: Mapping[str, Any], recipe: str, ckpt_dir: str) -> dict[str, Any]:
    # recipes/gpt.py saves its config as extra["run"], recipes/digits.py as extra["config"].
    for key in ("run", "config"):
        if isinstance(extra.get(key), Mapping):
            return dict(extra[key])
    raise ValueError(f"export_recipe: the checkpoint in {ckpt_dir} has no recipe config (extra['run'] or "
                     f"extra['config']); was it written by recipes/{recipe}.py? extra keys: {sorted(extra)}")


def _known_fields(config_class: type, config: Mapping[str, Any]) -> dict[str, Any]:
    names = {field.name for field in dataclasses.fields(config_class)}
    return {k: v for k, v in config.items() if k in names}


Built = tuple[Callable[..., Any], Any, np.ndarray, tuple[tuple[str, ...], tuple[str, ...]], dict | None, dict, Any,
              Callable[[], list[np.ndarray]]]


GPT_QUANTIZED_MODULES = r"block_\d+/(attention|mlp)"


def _quantized(recipe: str, mode: str, model, variables, example, calibration) -> Any:  # quant.QuantizedModel
    from lepton_jax import quant

    if mode not in quant.MODES:
        raise ValueError(f"export_recipe: quantize must be one of {quant.MODES}, got {mode!r}")
    options: dict[str, Any] = {}
    if recipe == "gpt":
        # The blocks' projections and MLPs: the tied embedding also feeds a
        # gather, which qwix cannot take quantized, and the products of two
        # activations inside attention (module ``attention/core``) stay in float.
        # One static scale per activation, shared over batch and positions.
        options = dict(module_path=GPT_QUANTIZED_MODULES, act_batch_axes=(0, 1))
    return quant.quantize(model, variables, example, mode=mode,
                          calibration=calibration() if mode == "int8" else None, **options)


def _digits(manager, step: int, extra: Mapping[str, Any], ckpt_dir: str) -> Built:
    digits = _import_recipe("digits")
    config = _recipe_config(extra, "digits", ckpt_dir)
    model = digits.build_model(config.get("model", "cnn"), config.get("hidden", ""))
    # The full state: the CNN's BatchNorm statistics live in model_state.
    state = manager.restore(step)
    variables = {"params": state["params"], **dict(state.get("model_state") or {})}
    normalizer = extra.get("normalizer")
    if normalizer is None:  # an older checkpoint: refit on the same training split
        normalizer = digits.load_splits(int(config.get("seed", 0)))[3].to_dict()

    def digits_logits(variables, images_BxHxWxC):
        return model.apply(variables, images_BxHxWxC, train=False)

    example = np.zeros((1, 8, 8, 1), np.float32)
    preprocessing = {"normalize": {"mean": normalizer["mean"], "std": normalizer["std"]}}

    def calibration() -> list[np.ndarray]:  # normalized training images, as the model saw them
        images = digits.load_splits(int(config.get("seed", 0)))[0]["image"]
        return [images[i:i + 64] for i in range(0, 256, 64)]

    return (digits_logits, variables, example, (("images",), ("logits",)), preprocessing, config, model,
            calibration)


def _gpt(manager, step: int, extra: Mapping[str, Any], ckpt_dir: str) -> Built:
    gpt = _import_recipe("gpt")
    config = _recipe_config(extra, "gpt", ckpt_dir)
    run, model, _ = gpt.build(gpt.RunConfig(**_known_fields(gpt.RunConfig, config)))
    # "auto" picks a kernel from the exporting machine's backend at trace time;
    # an artifact lowered for several platforms needs the portable XLA path.
    model = model.clone(config=dataclasses.replace(model.config, attention_implementation="xla",
                                                   norm_implementation="xla"))
    params = manager.restore(step, params_only=True)

    def gpt_logits(variables, tokens_BxS):
        return model.apply(variables, tokens_BxS, train=False)

    example = np.zeros((1, run.seq_len), np.int32)

    def calibration() -> list[np.ndarray]:  # training-split windows of the recipe's corpus
        from lepton_jax import data

        tokens = data.load_bytes(run.data.split(",") if run.data else None, max_bytes=run.max_bytes)
        windows = data.eval_windows(data.split_tokens(tokens, 0.05)[0], run.seq_len, 32)["inputs"]
        return [windows[i:i + 8] for i in range(0, len(windows), 8)]

    return gpt_logits, {"params": params}, example, (("tokens",), ("logits",)), None, config, model, calibration
