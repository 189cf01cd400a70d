"""Exported models: ``jax.export`` artifacts in versioned model directories.

    path = export_model("models/digits", apply_fn, variables, images[:1])   # -> models/digits/1
    model = load("models/digits")                                           # the latest version
    logits = model(images)                                                  # any batch size

``export_recipe(recipe, ckpt_dir, out_dir)`` exports the checkpoint of a
registered recipe (``lepton_jax.registry``); ``to_onnx`` and
``export_recipe_onnx`` write ONNX files for edge runtimes. Names load lazily: ``from
lepton_jax.export import load`` imports only ``loader.py`` (jax and numpy),
so a server loads a model without flax, optax or orbax.
"""

from lepton_jax import _lazy

_NAMES = {"Generator": "loader", "LoadedModel": "loader", "list_versions": "loader", "load": "loader",
          "DEFAULT_PLATFORMS": "model_dir", "export_model": "model_dir", "export_decoder": "generation",
          "export_recipe": "from_recipe", "export_recipe_onnx": "from_recipe", "to_onnx": "onnx"}
__getattr__, __dir__ = _lazy.attach(__name__, names=_NAMES)
__all__ = sorted(_NAMES)
