"""Low-rank adapters on a params tree, in weight-delta form.

An adapted weight ``W`` stored ``(in..., out...)`` becomes ``W + scale *
(a @ b).reshape(W.shape)`` with ``a`` ``[prod(in), r]`` and ``b`` ``[r,
prod(out)]``: the model's code is unchanged, only the params it receives.
Adapters are nested dicts keyed like the params, one ``{"a", "b"}`` per
adapted weight, float32.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec

from lepton_jax._pytree import named_shapes, path_str
from lepton_jax.quant.weights import Int8Weight, dequantize, quantize_int8

PyTree = Any
BASE_DTYPES = ("float32", "bfloat16", "int8")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which weights get adapters and how large.

    ``pattern``: a regex ``re.search``-ed in each parameter's '/'-joined path
    (``"block_0/attention/query"``); matched weights with >= 2 dims get an
    adapter, matched 1-D ones (biases, norm scales) are left as they are.
    ``rank``: r. ``alpha``: the delta is scaled by ``alpha / rank``.
    ``dropout``: probability of dropping an input feature of ``a`` in
    training (see ``merge``).
    """

    pattern: str
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"LoRAConfig: pattern must be a str, got {type(self.pattern).__name__}")
        try:
            re.compile(self.pattern)
        except re.error as error:
            raise ValueError(f"LoRAConfig: pattern {self.pattern!r} is not a valid regex ({error})") from None
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRAConfig: rank must be an int >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig: alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        """The factor of the delta: ``alpha / rank``."""
        return self.alpha / self.rank


def input_dims(shape: tuple[int, ...], axes: tuple[str | None, ...] | None = None) -> int:
    """How many leading dims of a kernel are its inputs.

    With logical ``axes`` whose last is ``"embed"`` and more than 2 dims (an
    output projection ``("heads", "head_dim", "embed")``): all but the last.
    Otherwise the first (``Dense`` ``(in, out)``, a query ``("embed", "heads",
    "head_dim")``). A convolution kernel ``(kh, kw, in, out)`` takes the first
    rule too: its delta is still a valid weight update, of rank <= r along
    ``kh`` rather than along the input channels.
    """
    if axes and len(axes) == len(shape) > 2 and axes[-1] == "embed":
        return len(shape) - 1
    return 1


def init(key: jax.Array, params: PyTree, config: LoRAConfig, *, logical_axes: PyTree | None = None) -> PyTree:
    """Adapters for the weights of ``params`` (float or frozen) that
    ``config.pattern`` matches.

    ``a`` ``[prod(in), r]`` is drawn as PEFT's ``lora_A`` (kaiming-uniform
    with a=sqrt(5): U(-1/sqrt(prod(in)), 1/sqrt(prod(in)))), ``b`` ``[r,
    prod(out)]`` is zero, so the adapted model starts equal to the base.
    ``logical_axes``: the params tree of ``PartitionSpec`` names
    (``parallel.param_logical_axes``), which tells the inputs of
    multi-dim kernels (``input_dims``); without it the first dim is the input.
    Raises if the pattern matches no weight of >= 2 dims.
    """
    regex = re.compile(config.pattern)
    shapes = named_shapes(params, is_leaf=_is_frozen_leaf)  # an Int8Weight is one leaf
    matched = {name: shape for name, shape in shapes.items() if regex.search(name) and len(shape) >= 2}
    if not matched:
        available = [name for name, shape in shapes.items() if len(shape) >= 2]
        raise ValueError(f"lora.init: pattern {config.pattern!r} matches no parameter with >= 2 dims; "
                         f"parameters with >= 2 dims: {available[:8]}{' ...' if len(available) > 8 else ''}")
    axes_by_name = _named_axes(logical_axes) if logical_axes is not None else {}
    adapters: dict[tuple[str, ...], jax.Array] = {}
    for index, (name, shape) in enumerate(matched.items()):
        axes = None
        if logical_axes is not None:
            if name not in axes_by_name:
                raise ValueError(f"lora.init: logical_axes has no entry for {name!r}")
            axes = tuple(axes_by_name[name])
            if axes and len(axes) != len(shape):
                raise ValueError(f"lora.init: logical_axes for {name!r} name {len(axes)} dims {axes}, "
                                 f"but the parameter has shape {shape}")
        k = input_dims(shape, axes)
        fan_in, fan_out = math.prod(shape[:k]), math.prod(shape[k:])
        bound = 1.0 / math.sqrt(fan_in)
        a_IxR = jax.random.uniform(jax.random.fold_in(key, index), (fan_in, config.rank), jnp.float32,
                                   -bound, bound)
        keys = tuple(name.split("/"))
        adapters[(*keys, "a")] = a_IxR
        adapters[(*keys, "b")] = jnp.zeros((config.rank, fan_out), jnp.float32)
    return traverse_util.unflatten_dict(adapters)


def merge(params: PyTree, adapters: PyTree, config: LoRAConfig, *, dropout_key: jax.Array | None = None) -> PyTree:
    """``params`` with each adapted weight ``W`` replaced by ``W + scale *
    (a @ b).reshape(W.shape)``, in float32.

    Frozen leaves are read in float32 (an ``Int8Weight`` dequantized, bfloat16
    cast up); every ``Int8Weight`` comes back as a float32 array, adapted or
    not, and the other unadapted leaves keep their dtype.

    ``dropout_key`` (with ``config.dropout = p > 0``): each adapter's rows of
    ``a`` (its input features) are dropped with probability p and the rest
    scaled by 1/(1-p), one mask per adapter and key. This is dropout on the
    weights, not PEFT's dropout of the adapter's input activations per token:
    it needs no change to the model, and every token of a step sees the same
    mask. Differentiable in ``params`` and ``adapters``.
    """
    pairs = adapter_pairs(adapters, "lora.merge")
    order = {name: i for i, name in enumerate(sorted(pairs))}  # adapter i's mask: fold_in(dropout_key, i)
    p = float(config.dropout)
    seen = set()

    def merge_leaf(path, leaf):
        name = path_str(path)
        if name not in pairs:
            return dequantize(leaf) if isinstance(leaf, Int8Weight) else leaf
        seen.add(name)
        w = dequantize(leaf) if isinstance(leaf, Int8Weight) else jnp.asarray(leaf, jnp.float32)
        a_IxR, b_RxO = pairs[name]
        _check_fit(name, w.shape, a_IxR.shape, b_RxO.shape)
        a_IxR = a_IxR.astype(jnp.float32)
        if dropout_key is not None and p > 0:
            keep_I = jax.random.bernoulli(jax.random.fold_in(dropout_key, order[name]), 1.0 - p, a_IxR.shape[:1])
            a_IxR = jnp.where(keep_I[:, None], a_IxR / (1.0 - p), 0.0)
        # HIGHEST: the delta is small (rank r) and must not lose bits on TPU/GPU default matmul precision.
        delta_IxO = jnp.matmul(a_IxR, b_RxO.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return w + config.scale * delta_IxO.reshape(w.shape)

    merged = jax.tree_util.tree_map_with_path(merge_leaf, params, is_leaf=_is_frozen_leaf)
    missing = sorted(set(pairs) - seen)
    if missing:
        raise ValueError(f"lora.merge: adapters for {missing} have no parameter of that path in params")
    return merged


def freeze(params: PyTree, dtype: str = "float32") -> PyTree:
    """``params`` stored for a frozen base: ``"float32"``, ``"bfloat16"`` or
    ``"int8"`` (``quant.Int8Weight``, per-output-channel scales).

    Only floating leaves of >= 2 dims are converted to bfloat16/int8; 1-D
    leaves (biases, norm scales) stay float32 (small, and sensitive to
    rounding). With ``"float32"`` every floating leaf is float32. Leaves of
    other dtypes are left as they are.
    """
    if dtype not in BASE_DTYPES:
        raise ValueError(f"lora.freeze: dtype must be one of {BASE_DTYPES}, got {dtype!r}")

    def freeze_leaf(leaf):
        if isinstance(leaf, Int8Weight):
            raise TypeError("lora.freeze: params are already frozen to int8 (found an Int8Weight)")
        x = jnp.asarray(leaf)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if x.ndim < 2 or dtype == "float32":
            return x.astype(jnp.float32)
        return quantize_int8(x) if dtype == "int8" else x.astype(jnp.bfloat16)

    return jax.tree.map(freeze_leaf, params, is_leaf=_is_frozen_leaf)


def adapter_pairs(adapters: PyTree, where: str) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{path: (a, b)}`` from an adapters tree, checking its structure:
    every entry is ``{"a": [in, r], "b": [r, out]}``."""
    if not isinstance(adapters, Mapping):
        raise TypeError(f"{where}: adapters must be nested dicts, got {type(adapters).__name__}")
    flat = traverse_util.flatten_dict(adapters)
    grouped: dict[str, dict[str, Any]] = {}
    for keys, leaf in flat.items():
        if keys[-1] not in ("a", "b") or len(keys) < 2:
            raise ValueError(f"{where}: adapter entries must end in 'a' or 'b', got {'/'.join(map(str, keys))!r}")
        grouped.setdefault("/".join(map(str, keys[:-1])), {})[keys[-1]] = leaf
    pairs = {}
    for name, entry in grouped.items():
        if set(entry) != {"a", "b"}:
            raise ValueError(f"{where}: adapter {name!r} must hold both 'a' and 'b', got {sorted(entry)}")
        a_shape, b_shape = jnp.shape(entry["a"]), jnp.shape(entry["b"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            raise ValueError(f"{where}: adapter {name!r} needs a [in, r] and b [r, out], "
                             f"got a {a_shape} and b {b_shape}")
        pairs[name] = (entry["a"], entry["b"])
    return pairs


def _check_fit(name: str, w_shape, a_shape, b_shape) -> None:
    fits = any(math.prod(w_shape[:k]) == a_shape[0] and math.prod(w_shape[k:]) == b_shape[1]
               for k in range(1, len(w_shape)))
    if not fits:
        raise ValueError(f"lora.merge: adapter {name!r} has a {tuple(a_shape)} and b {tuple(b_shape)}, "
                         f"which do not split the parameter's shape {tuple(w_shape)} into (in..., out...)")


def _is_frozen_leaf(x: Any) -> bool:
    return isinstance(x, Int8Weight)


def _named_axes(logical_axes: PyTree) -> dict[str, tuple]:
    is_spec = lambda x: isinstance(x, (PartitionSpec, tuple))  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(logical_axes, is_leaf=is_spec)
    return {path_str(path): tuple(spec) for path, spec in leaves}
