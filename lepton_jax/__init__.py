"""lepton_jax: a JAX-native functional deep-learning framework.

Subpackages: ``nn`` (linen layers), ``ops`` (functional ops, losses, metrics),
``optim`` (optax presets), ``data``, ``train`` (TrainState, steps, ``fit`` and
its hooks), ``checkpoint`` (Orbax), ``models`` (reference models),
``parallel`` (meshes and sharding rules), ``export``, ``serve``, ``quant``,
``prune``, ``pallas`` (kernels), ``registry`` (recipes), ``tune``
(hyper-parameter search on Optuna), ``convert`` (Hugging Face checkpoints
in and out), ``lora`` (low-rank adapters). Each is imported the
first time it is used (``lepton_jax.train``), so ``import lepton_jax`` is cheap.
"""

from lepton_jax import _lazy

__version__ = "0.1.0"

SUBPACKAGES = ("checkpoint", "config", "data", "export", "models", "nn", "ops", "optim", "pallas", "parallel",
               "prune", "quant", "registry", "sampling", "serve", "train", "tune", "convert", "lora", "nnx")
__getattr__, __dir__ = _lazy.attach(__name__, submodules=SUBPACKAGES)
__all__ = ["__version__", *SUBPACKAGES]
