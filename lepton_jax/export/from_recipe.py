"""``export_recipe``: a recipe's checkpoint to a model directory.

Recipes own their model definitions; each registers (``lepton_jax.registry``)
an ``export`` function that rebuilds its model from the config a checkpoint
carries under ``extra["config"]``. The library looks recipes up by name in
the registry and never imports one.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from lepton_jax import registry
from lepton_jax.export.model_dir import DEFAULT_PLATFORMS, export_model


def export_recipe(recipe: str, ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None,
                  *, platforms: Sequence[str] = DEFAULT_PLATFORMS, quantize: str | None = None) -> str:
    """Exports the model a recipe trained into ``out_dir/<next version>/``.

    Args:
      recipe: a registered recipe's name (``registry.names()``), e.g.
        ``"digits"`` (images ``float32[b, 8, 8, 1]`` in [0, 1] -> logits
        ``[b, 10]``; the training split's normalization is recorded as
        preprocessing) or ``"gpt"`` (tokens ``int32[b, seq_len]`` -> next-token
        logits ``[b, seq_len, vocab]``).
      ckpt_dir: the run's checkpoint directory, or its output directory
        holding ``checkpoints/``.
      out_dir: the model directory to add a version to.
      step: the checkpoint step; ``None``: the latest.
      platforms: as for ``export_model``.
      quantize: ``None``, ``"int8"`` (weights and activations, scales from
        training batches) or ``"int8_weight"`` (``lepton_jax.quant``).

    Returns:
      The path of the written version directory.
    """
    parts, ckpt_dir, step, metrics = _recipe_parts(recipe, ckpt_dir, step, "export_recipe")
    apply_fn, variables, model = parts.apply_fn, parts.variables, parts.model
    quantized = None
    if quantize is not None:
        quantized = _quantized(quantize, parts)
        apply_fn, variables = quantized.export_parts()
    metadata = {"recipe": recipe, "source": {"checkpoint_dir": ckpt_dir, "step": step},
                "metrics": metrics, "config": dict(parts.config), "quantization": quantize}
    path = export_model(out_dir, apply_fn, variables, parts.example_inputs, input_names=parts.input_names,
                        output_names=parts.output_names, platforms=platforms,
                        preprocessing=None if parts.preprocessing is None else dict(parts.preprocessing),
                        metadata=metadata)
    if parts.decoder is not None:  # a KV-cache decode step for :generate
        from lepton_jax.export.generation import export_decoder

        if quantized is None:
            export_decoder(path, model, variables, platforms=platforms, tokenizer=parts.decoder)
        else:  # the same int8 weights and static scales, stored flat in params.npz
            export_decoder(path, quantized.model, variables, platforms=platforms,
                           tokenizer=parts.decoder, rebuild=quantized.flat_variables()[1])
    return path


def _recipe_parts(recipe: str, ckpt_dir: str | os.PathLike, step: int | None,
                  where: str) -> tuple[registry.ExportParts, str, int, dict]:
    """The recipe's ``ExportParts`` for a checkpoint step, with the resolved directory, step and metrics."""
    try:
        spec = registry.get(recipe)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if spec.export is None:
        raise ValueError(f"{where}: recipe {recipe!r} registers no export")
    from lepton_jax import checkpoint  # lazy: orbax is only needed here, not to load an export

    ckpt_dir = checkpoint.paths.checkpoint_dir(ckpt_dir, where=where)
    with checkpoint.CheckpointManager(ckpt_dir, async_save=False) as manager:
        step = checkpoint.paths.resolve_step(manager.all_steps(), step, ckpt_dir, where=where)
        extra, metrics = manager.extra(step), manager.metrics(step)
        if not isinstance(extra.get("config"), dict):
            raise ValueError(f"{where}: the checkpoint in {ckpt_dir} has no recipe config (extra['config']); "
                             f"was it written by the {recipe!r} recipe? extra keys: {sorted(extra)}")
        parts = spec.export(manager, step, extra["config"])
    return parts, ckpt_dir, step, metrics


def export_recipe_onnx(recipe: str, ckpt_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
                       *, quantize: str | None = None) -> str:
    """A recipe's checkpoint as an ONNX file (``export.onnx.to_onnx``): raw
    inputs (the preprocessing is in the graph), a dynamic batch axis.

    ``out``: a ``.onnx`` path, or a directory that gets ``model.onnx``.
    ``quantize="int8"``: also ONNX Runtime's dynamic int8 quantization,
    written beside it as ``*-int8.onnx`` (whose path is returned).
    """
    from lepton_jax.export import onnx as onnx_export

    if quantize not in (None, "int8"):
        raise ValueError(f"export_recipe_onnx: quantize must be None or 'int8' for ONNX, got {quantize!r}")
    parts, _, _, _ = _recipe_parts(recipe, ckpt_dir, step, "export_recipe_onnx")
    out = os.fspath(out)
    path = out if out.endswith(".onnx") else os.path.join(out, "model.onnx")
    if os.path.exists(path):
        raise ValueError(f"export_recipe_onnx: {path} already exists")
    onnx_export.to_onnx(parts.apply_fn, parts.variables, parts.example_inputs, path, input_names=parts.input_names,
                        output_names=parts.output_names,
                        preprocessing=None if parts.preprocessing is None else dict(parts.preprocessing))
    if quantize == "int8":
        return onnx_export.quantize_int8(path, path[:-len(".onnx")] + "-int8.onnx")
    return path


def _quantized(mode: str, parts: registry.ExportParts) -> Any:  # quant.QuantizedModel
    from lepton_jax import quant

    if mode not in quant.MODES:
        raise ValueError(f"export_recipe: quantize must be one of {quant.MODES}, got {mode!r}")
    if mode == "int8" and parts.calibration is None:
        raise ValueError("export_recipe: quantize='int8' needs calibration batches, which this recipe does not give")
    return quant.quantize(parts.model, parts.variables, parts.example_inputs, mode=mode,
                          calibration=parts.calibration() if mode == "int8" else None, **parts.quantize_options)
