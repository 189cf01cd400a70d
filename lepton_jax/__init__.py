"""lepton_jax: a JAX-native functional deep-learning framework.

Subpackages: ``nn`` (linen layers), ``ops`` (functional ops, losses, metrics),
``optim`` (optax presets), ``data``, ``train`` (TrainState, steps, ``fit``),
``checkpoint`` (Orbax), ``models`` (reference models).
"""

__version__ = "0.1.0"

from lepton_jax import checkpoint, config, data, models, nn, ops, optim, parallel, train  # noqa: E402

__all__ = ["__version__", "checkpoint", "config", "data", "models", "nn", "ops", "optim", "parallel", "train"]
