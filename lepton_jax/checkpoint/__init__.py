"""Orbax-backed checkpoints: ``CheckpointManager`` saves/restores any pytree."""

from lepton_jax.checkpoint.manager import CheckpointManager

__all__ = ["CheckpointManager"]
