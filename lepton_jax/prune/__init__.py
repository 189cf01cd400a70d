"""Magnitude pruning (unstructured global/per-layer and N:M structured) as an
optax transformation with a gradual sparsity schedule."""

from lepton_jax.prune.magnitude import (
    MagnitudePruneState,
    apply_masks,
    default_prunable,
    magnitude_prune,
    polynomial_sparsity,
    sparsity,
)

__all__ = ["MagnitudePruneState", "apply_masks", "default_prunable", "magnitude_prune", "polynomial_sparsity",
           "sparsity"]
