"""Orbax-backed checkpoints: ``CheckpointManager`` saves/restores any pytree;
``restore`` loads one in a line."""

from lepton_jax.checkpoint import paths
from lepton_jax.checkpoint.manager import CheckpointManager, CorruptCheckpointError, restore

__all__ = ["CheckpointManager", "CorruptCheckpointError", "paths", "restore"]
