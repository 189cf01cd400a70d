"""Reference models built from ``lepton_jax.nn``."""

from lepton_jax.models.classifiers import CNN, LSTMClassifier, MLPClassifier

__all__ = ["CNN", "LSTMClassifier", "MLPClassifier"]
