"""Reference classifiers: an MLP, a LeNet-style CNN and an LSTM over image rows.

Each is a linen module called as ``model.apply(variables, x, train=bool)``
with images ``x_BxHxWxC`` (float) and returning logits ``[B, num_classes]``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax import nn


def _check_images(x: jax.Array, where: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{where}: x must have rank 4 [batch, height, width, channels], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{where}: x must be floating point, got dtype {x.dtype}")


class MLPClassifier(linen.Module):
    """Flattens images and applies an MLP: ``[B, H, W, C] -> [B, num_classes]``.

    Kernels carry logical axes (hidden layers alternate ``("embed", "mlp")``
    and ``("mlp", "embed")``), so FSDP and tensor-parallel rules shard them.
    """

    num_classes: int = 10
    hidden: Sequence[int] = (256, 128)
    dropout_rate: float = 0.1

    @linen.compact
    def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
        _check_images(x_BxHxWxC, "MLPClassifier")
        x_BxF = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1)
        widths = (*self.hidden, self.num_classes)
        axes = [(None, "mlp") if i == 0 else (("mlp", "embed") if i % 2 else ("embed", "mlp"))
                for i in range(len(widths) - 1)]
        axes.append(("mlp" if len(widths) % 2 == 0 else "embed", None) if len(widths) > 1 else (None, None))
        mlp = nn.MLP(features=widths, dropout_rate=self.dropout_rate, kernel_axes=axes)
        return mlp(x_BxF, train=train)


class CNN(linen.Module):
    """LeNet-style CNN: two conv/BatchNorm/ReLU/max-pool stages, then two dense layers.

    BatchNorm's running statistics live in the ``batch_stats`` collection,
    which the train state carries as ``model_state``.
    """

    num_classes: int = 10
    channels: Sequence[int] = (32, 64)
    hidden: int = 128
    dropout_rate: float = 0.25

    @linen.compact
    def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
        _check_images(x_BxHxWxC, "CNN")
        h = x_BxHxWxC
        for width in self.channels:
            h = nn.Conv(width, kernel_size=(3, 3), padding="SAME", use_bias=False)(h)
            h = nn.BatchNorm(momentum=0.9)(h, use_running_average=not train)
            h = jax.nn.relu(h)
            h = nn.max_pool(h, window=(2, 2), strides=(2, 2), padding="SAME")
        h = h.reshape(h.shape[0], -1)
        h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        h = jax.nn.relu(nn.Dense(self.hidden)(h))
        h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
        return nn.Dense(self.num_classes)(h)


class LSTMClassifier(linen.Module):
    """Reads an image row by row with an LSTM: ``[B, H, W, C]`` is a length-H
    sequence of ``W*C`` features; the last hidden state goes to a dense head."""

    num_classes: int = 10
    features: int = 128

    @linen.compact
    def __call__(self, x_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
        _check_images(x_BxHxWxC, "LSTMClassifier")
        B, H, W, C = x_BxHxWxC.shape
        x_BxTxF = x_BxHxWxC.reshape(B, H, W * C)
        outputs_BxTxH, _ = nn.LSTM(self.features)(x_BxTxF)
        return nn.Dense(self.num_classes)(outputs_BxTxH[:, -1])
