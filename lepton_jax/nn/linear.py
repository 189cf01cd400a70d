"""Dense layers and the MLP."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as linen
import jax

from lepton_jax.nn._checks import check_float_input, check_stored_in_features, compute_dtype_of_input
from lepton_jax.nn.axes import logical_param
from lepton_jax.nn.dropout import Dropout


class Dense(linen.Dense):
    """``flax.linen.Dense``: ``y = x @ kernel + bias``, ``[..., in] -> [..., features]``.

    Added here: ``dtype=None`` computes in the input's dtype (linen promotes
    to the params'), ``kernel_axes`` (e.g. ``("embed", "mlp")``) names the
    kernel's logical axes for ``lepton_jax.parallel`` rules (the bias takes
    the output axis's name), and an integer input or one of the wrong width
    gets an error naming what was received. Every linen field
    (``dot_general`` for quantizers, ``precision``, ...) works as in linen.
    """

    promote_dtype: Callable[..., tuple[Any, ...]] = compute_dtype_of_input
    kernel_axes: tuple[str | None, str | None] | None = None

    @linen.compact
    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        check_float_input("Dense", x_NxI)
        check_stored_in_features(self, "Dense", x_NxI, 0, "input features")
        return super().__call__(x_NxI)

    def param(self, name: str, init_fn: Callable[..., Any], shape: Sequence[int], dtype: Any) -> Any:
        axes = None
        if self.kernel_axes is not None:
            axes = {"kernel": tuple(self.kernel_axes), "bias": (self.kernel_axes[1],)}[name]
        return logical_param(self, name, init_fn, shape, axes, dtype)


class MLP(linen.Module):
    """Dense layers of widths ``features`` with ``activation`` between them (not
    after the last) and dropout after each hidden activation.

    ``kernel_axes``: optional logical axes per layer (see ``Dense``). Dropout
    runs only with ``train=True`` (the flag every lepton_jax model takes).
    """

    features: Sequence[int]
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
    dropout_rate: float = 0.0
    use_bias: bool = True
    kernel_axes: Sequence[tuple[str | None, str | None]] | None = None

    @linen.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if not self.features:
            raise ValueError("MLP: features must list at least one layer width, got ()")
        if self.kernel_axes is not None and len(self.kernel_axes) != len(self.features):
            raise ValueError(f"MLP: kernel_axes must name {len(self.features)} layers, got {len(self.kernel_axes)}")
        for i, width in enumerate(self.features):
            axes = self.kernel_axes[i] if self.kernel_axes is not None else None
            x = Dense(width, use_bias=self.use_bias, kernel_axes=axes)(x)
            if i < len(self.features) - 1:
                x = self.activation(x)
                if self.dropout_rate > 0:
                    x = Dropout(self.dropout_rate)(x, deterministic=not train)
        return x
