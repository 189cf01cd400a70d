"""Dense layers and the MLP."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax.nn._checks import cast, check_float_input, check_stored_in_features
from lepton_jax.nn.dropout import Dropout

Initializer = Callable[..., jax.Array]


class Dense(linen.Module):
    """``y = x @ kernel + bias``: ``[..., in] -> [..., features]``.

    ``dtype`` is the compute dtype (default: the input's); parameters are
    stored in ``param_dtype``. ``kernel_axes`` (e.g. ``("embed", "mlp")``)
    names the kernel's logical axes for ``lepton_jax.parallel`` rules; the
    bias takes the output axis's name.
    """

    features: int
    use_bias: bool = True
    kernel_init: Initializer = linen.initializers.lecun_normal()
    bias_init: Initializer = linen.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_axes: tuple[str | None, str | None] | None = None

    @linen.compact
    def __call__(self, x_NxI: jax.Array) -> jax.Array:
        check_float_input("Dense", x_NxI)
        check_stored_in_features(self, "Dense", x_NxI, 0, "input features")
        kernel_init, bias_init = self.kernel_init, self.bias_init
        if self.kernel_axes is not None:
            kernel_init = linen.with_logical_partitioning(kernel_init, tuple(self.kernel_axes))
            bias_init = linen.with_logical_partitioning(bias_init, (self.kernel_axes[1],))
        kernel_IxF = self.param("kernel", kernel_init, (x_NxI.shape[-1], self.features), self.param_dtype)
        dtype = self.dtype or x_NxI.dtype
        # lax.dot_general, not jnp.dot (a jitted wrapper): quantization libraries
        # that intercept dot_general (qwix) then see it in this module's scope.
        x_NxI = cast(x_NxI, dtype)
        y_NxF = jax.lax.dot_general(x_NxI, cast(kernel_IxF, dtype), (((x_NxI.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            bias_F = self.param("bias", bias_init, (self.features,), self.param_dtype)
            y_NxF = y_NxF + cast(bias_F, dtype)
        return y_NxF


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
