"""Exported models: ``jax.export`` artifacts in versioned model directories.

    path = export_model("models/digits", apply_fn, variables, images[:1])   # -> models/digits/1
    model = load("models/digits")                                           # the latest version
    logits = model(images)                                                  # any batch size

``export_recipe(recipe, ckpt_dir, out_dir)`` exports the checkpoint of a
registered recipe (``lepton_jax.registry``). ``loader.py`` imports only jax and numpy, so a server can load a
model without flax (importing it by file path skips ``lepton_jax/__init__``,
which imports the whole framework).
"""

from lepton_jax.export.from_recipe import export_recipe
from lepton_jax.export.generation import export_decoder
from lepton_jax.export.loader import Generator, LoadedModel, list_versions, load
from lepton_jax.export.model_dir import DEFAULT_PLATFORMS, export_model

__all__ = ["DEFAULT_PLATFORMS", "Generator", "LoadedModel", "export_decoder", "export_model", "export_recipe",
           "list_versions", "load"]
