"""The problem both the two-process workers and the one-process reference train."""

import numpy as np
import optax

from lepton_jax import models, train

STEPS = 4


def make_problem():
    rng = np.random.default_rng(0)
    dataset = {"image": rng.normal(size=(64, 4, 4, 1)).astype(np.float32),
               "label": rng.integers(0, 5, 64).astype(np.int32)}
    model = models.MLPClassifier(num_classes=5, hidden=(16,), dropout_rate=0.0)
    return model, optax.adam(1e-2), train.classification_loss(), dataset, 16

GRAIN_RECORDS = 64  # records of the Grain loader check (8 global batches of 8)
