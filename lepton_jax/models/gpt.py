"""A GPT-style decoder annotated with logical axes for SPMD training.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``vocab``) through ``nn.logical_param`` (as
``nn.Dense(kernel_axes=...)`` does), and activations are constrained to
``("batch", "seq", "embed")`` between blocks, so ``lepton_jax.parallel``
rules decide data / FSDP / tensor parallelism. Attention and norms go
through ``lepton_jax.ops`` (``implementation=`` picks the kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, NamedTuple

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import nn, ops
from lepton_jax._pytree import named_shapes
from lepton_jax.models import pipeline as pipeline_lib
from lepton_jax.nn._checks import cast
from lepton_jax.sampling import Sampler

ACTIVATION = ("batch", "seq", "embed")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3's rotary frequency scaling (``rope_type: "llama3"``): wavelengths
    longer than ``original_max_len / low_freq_factor`` are stretched by
    ``factor``, shorter than ``original_max_len / high_freq_factor`` are kept,
    and the band between is interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192

    def inverse_frequencies(self, inv_freq: jax.Array) -> jax.Array:
        wavelength = 2 * math.pi / inv_freq
        long_wave = self.original_max_len / self.low_freq_factor
        short_wave = self.original_max_len / self.high_freq_factor
        smooth = (self.original_max_len / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor)
        between = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        return jnp.where(wavelength > long_wave, inv_freq / self.factor,
                         jnp.where(wavelength < short_wave, inv_freq, between))


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    max_len: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: as many as num_heads; fewer: GQA/MQA
    d_model: int = 64
    d_ff: int = 256
    positions: str = "learned"  # or "rotary"
    mlp: str = "gelu"  # or "swiglu"
    norm: str = "layer"  # or "rms"
    tie_embeddings: bool = True
    dtype: Any = jnp.float32  # compute dtype; params stay fp32
    attention_implementation: str = "auto"
    norm_implementation: str = "auto"
    remat: bool = False
    # Training returns an ``LMHead`` (hidden states and the output matrix)
    # for ``lm_loss`` to fuse the projection into the cross-entropy, so the
    # [tokens, vocab] logits are never materialised. Evaluation and decoding
    # still return logits.
    fused_loss: bool = False
    # Pretrained families (lepton_jax.convert): GPT-2 has biases on every
    # projection; Llama sets rope_theta, rope_scaling, head_size, norm_eps.
    use_bias: bool = False
    norm_eps: float = 0.0  # 0: the norm's default (LayerNorm 1e-5, RMSNorm 1e-6)
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    head_size: int = 0  # 0: d_model // num_heads
    # Stack the blocks' parameters on a leading ``layers`` axis (``params["blocks"]``)
    # and run them with ``lax.scan``; needed for pipeline parallelism. When the
    # rules put ``layers``/``stages`` on a mesh axis of size N > 1 (``stage``),
    # the blocks run as a pipeline of N stages (``models.pipeline``):
    # ``pipeline_microbatches`` M, ``pipeline_repeats`` R (circular when > 1),
    # and ``remat`` then rematerialises per stage.
    scan_layers: bool = False
    pipeline_microbatches: int = 1
    pipeline_repeats: int = 1

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.num_heads


class LMHead(NamedTuple):
    """What a ``fused_loss`` GPT returns in training: the final hidden
    states ``[B, S, E]`` (compute dtype) and the output matrix ``[E, V]``."""

    hidden_BxSxE: jax.Array
    head_ExV: jax.Array


def _param(module: linen.Module, name: str, shape, axes, init=None) -> jax.Array:
    return nn.logical_param(module, name, init or linen.initializers.normal(stddev=0.02), shape, axes)


def _bias(module: linen.Module, name: str, y: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``y + bias`` over the trailing ``axes`` when the config has ``use_bias`` (GPT-2)."""
    if not module.config.use_bias:
        return y
    bias = nn.logical_param(module, f"{name}_bias", linen.initializers.zeros_init(), y.shape[-len(axes):], axes)
    return y + cast(bias, y.dtype)


def _constrain(x: jax.Array) -> jax.Array:
    return linen.with_logical_constraint(x, ACTIVATION)


def _rotary(x_BxSxHxD: jax.Array, positions_BxS: jax.Array, config: GPTConfig) -> jax.Array:
    """Rotary embedding at ``positions`` ``[B or 1, S]`` (each decoded row has its own)."""
    D = x_BxSxHxD.shape[-1]
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    if config.rope_scaling is not None:
        inv_freq = config.rope_scaling.inverse_frequencies(inv_freq)
    angles_BxSxD2 = positions_BxS[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angles_BxSxD2)[:, :, None], jnp.cos(angles_BxSxD2)[:, :, None]
    x1, x2 = jnp.split(x_BxSxHxD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_BxSxHxD.dtype)


class _Norm(linen.Module):
    config: GPTConfig

    @linen.compact
    def __call__(self, x):
        c = self.config
        if c.norm == "rms":
            return nn.RMSNorm(eps=c.norm_eps or 1e-6, implementation=c.norm_implementation)(x)
        return nn.LayerNorm(eps=c.norm_eps or 1e-5, implementation=c.norm_implementation)(x)


class AttentionCore(linen.Module):
    """``ops.attention`` as a child module without parameters (``.../attention/core``):
    quantizers that select modules by path (qwix) can take the projections and
    leave the products of two activations in float."""

    @linen.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, **kwargs: Any) -> jax.Array:
        # The rules put the sequence on a mesh axis (context parallelism): ring attention over it.
        # (Initialisation traces a batch of one: no ring needed for shapes.)
        if q.shape[1] == k.shape[1] and not self.is_initializing() and ops.sequence_axis() is not None:
            return ops.sequence_parallel_attention(q, k, v, **kwargs)
        return ops.attention(q, k, v, **kwargs)


class Attention(linen.Module):
    """Causal self-attention; with ``decode`` one new token attends to a KV
    cache (``"cache"`` collection) of up to ``max_len`` positions."""

    config: GPTConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array, positions_BxS: jax.Array, decode: bool = False,
                 segment_ids_BxS: jax.Array | None = None) -> jax.Array:
        c = self.config
        E, H, K, D = c.d_model, c.num_heads, c.kv_heads, c.head_dim
        w_q_ExHxD = _param(self, "query", (E, H, D), ("embed", "heads", "head_dim"))
        w_k_ExKxD = _param(self, "key", (E, K, D), ("embed", "kv_heads", "head_dim"))
        w_v_ExKxD = _param(self, "value", (E, K, D), ("embed", "kv_heads", "head_dim"))
        w_o_HxDxE = _param(self, "out", (H, D, E), ("heads", "head_dim", "embed"),
                           linen.initializers.normal(stddev=0.02 / (2 * c.num_layers) ** 0.5))
        x = x_BxSxE.astype(c.dtype)
        q_BxSxHxD = _bias(self, "query", jnp.einsum("bse,ehd->bshd", x, cast(w_q_ExHxD, c.dtype)), ("heads", "head_dim"))
        k_BxSxKxD = _bias(self, "key", jnp.einsum("bse,ekd->bskd", x, cast(w_k_ExKxD, c.dtype)), ("kv_heads", "head_dim"))
        v_BxSxKxD = _bias(self, "value", jnp.einsum("bse,ekd->bskd", x, cast(w_v_ExKxD, c.dtype)),
                          ("kv_heads", "head_dim"))
        if c.positions == "rotary":
            q_BxSxHxD, k_BxSxKxD = _rotary(q_BxSxHxD, positions_BxS, c), _rotary(k_BxSxKxD, positions_BxS, c)
        if decode:
            out_BxSxHxD = self._attend_cache(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, positions_BxS)
        else:
            segments = None if segment_ids_BxS is None else (segment_ids_BxS, segment_ids_BxS)
            out_BxSxHxD = AttentionCore(name="core")(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, causal=True,
                                                      segment_ids=segments,
                                                      implementation=c.attention_implementation)
        return _bias(self, "out", jnp.einsum("bshd,hde->bse", out_BxSxHxD, cast(w_o_HxDxE, c.dtype)), ("embed",))

    def _attend_cache(self, q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, positions_BxS):
        c = self.config
        B, S, K, D = k_BxSxKxD.shape
        if S != 1:
            raise ValueError(f"GPT decode: feed one token at a time, got {S}")
        shape = (B, c.max_len, K, D)
        cached_k = self.variable("cache", "key", jnp.zeros, shape, k_BxSxKxD.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, shape, v_BxSxKxD.dtype)
        if not self.is_initializing():
            # Each row writes at its own position (rows of a continuous batch are at different lengths).
            write = jax.vmap(lambda cache_TxKxD, new_1xKxD, at: jax.lax.dynamic_update_slice(cache_TxKxD, new_1xKxD,
                                                                                            (at, 0, 0)))
            cached_k.value = write(cached_k.value, k_BxSxKxD, positions_BxS[:, 0])
            cached_v.value = write(cached_v.value, v_BxSxKxD, positions_BxS[:, 0])
        # Keys written so far share segment 0 with the query; the rest are masked.
        kv_ids_BxT = (jnp.arange(c.max_len)[None] > positions_BxS[:, -1:]).astype(jnp.int32)
        q_ids_BxS = jnp.zeros((B, S), jnp.int32)
        return AttentionCore(name="core")(q_BxSxHxD, cached_k.value, cached_v.value,
                                           segment_ids=(q_ids_BxS, kv_ids_BxT), implementation="xla")


class MLPBlock(linen.Module):
    config: GPTConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array) -> jax.Array:
        c = self.config
        x = x_BxSxE.astype(c.dtype)
        w_in_ExF = _param(self, "w_in", (c.d_model, c.d_ff), ("embed", "mlp"))
        h_BxSxF = _bias(self, "w_in", jnp.einsum("bse,ef->bsf", x, cast(w_in_ExF, c.dtype)), ("mlp",))
        if c.mlp == "swiglu":
            w_gate_ExF = _param(self, "w_gate", (c.d_model, c.d_ff), ("embed", "mlp"))
            h_BxSxF = jax.nn.silu(jnp.einsum("bse,ef->bsf", x, cast(w_gate_ExF, c.dtype))) * h_BxSxF
        else:
            h_BxSxF = jax.nn.gelu(h_BxSxF, approximate=True)
        h_BxSxF = linen.with_logical_constraint(h_BxSxF, ("batch", "seq", "mlp"))
        w_out_FxE = _param(self, "w_out", (c.d_ff, c.d_model), ("mlp", "embed"),
                           linen.initializers.normal(stddev=0.02 / (2 * c.num_layers) ** 0.5))
        return _bias(self, "w_out", jnp.einsum("bsf,fe->bse", h_BxSxF, cast(w_out_FxE, c.dtype)), ("embed",))


class Block(linen.Module):
    config: GPTConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array, positions_BxS: jax.Array, decode: bool = False,
                 segment_ids_BxS: jax.Array | None = None) -> jax.Array:
        c = self.config
        attention = Attention(c, name="attention")(_Norm(c, name="attention_norm")(x_BxSxE), positions_BxS, decode,
                                                   segment_ids_BxS)
        x_BxSxE = x_BxSxE + attention.astype(x_BxSxE.dtype)
        x_BxSxE = x_BxSxE + MLPBlock(c, name="mlp")(_Norm(c, name="mlp_norm")(x_BxSxE)).astype(x_BxSxE.dtype)
        return _constrain(x_BxSxE)


class GPT(linen.Module):
    """Decoder-only transformer: ``tokens [B, S] int -> logits [B, S, vocab]`` (fp32).

    ``return_hidden=True`` returns the final normalized hidden states
    ``[B, S, d_model]`` instead (for a fused linear cross-entropy).
    ``decode=True`` takes one token ``[B, 1]`` at the position held in the
    ``"cache"`` collection (apply with ``mutable=["cache"]``; see ``generate``).
    ``segment_ids`` ``[B, S]`` (packed documents): a token attends only to
    earlier tokens of its own segment.
    """

    config: GPTConfig

    @linen.compact
    def __call__(self, tokens_BxS: jax.Array, *, train: bool = False, return_hidden: bool = False,
                 decode: bool = False, segment_ids: jax.Array | None = None) -> jax.Array:
        c = self.config
        if tokens_BxS.ndim != 2 or not jnp.issubdtype(tokens_BxS.dtype, jnp.integer):
            raise ValueError(f"GPT: tokens must be integer [batch, seq], got {tokens_BxS.dtype} {tokens_BxS.shape}")
        if segment_ids is not None and (decode or jnp.shape(segment_ids) != tokens_BxS.shape):
            raise ValueError(f"GPT: segment_ids must have the tokens' shape {tokens_BxS.shape} (and no decode), "
                             f"got {jnp.shape(segment_ids)}")
        if tokens_BxS.shape[1] > c.max_len and c.positions == "learned":
            raise ValueError(f"GPT: sequence length {tokens_BxS.shape[1]} exceeds max_len {c.max_len}")
        B, S = tokens_BxS.shape
        if decode:
            # One position per row: rows may be at different lengths (continuous batching).
            index = self.variable("cache", "index", lambda: jnp.zeros((B,), jnp.int32))
            positions_BxS = index.value[:, None] + jnp.arange(S)[None]
            if not self.is_initializing():
                index.value = index.value + S
        else:
            positions_BxS = jnp.arange(S)[None]
        embedding_VxE = _param(self, "embedding", (c.vocab_size, c.d_model), ("vocab", "embed"))
        x_BxSxE = jnp.take(embedding_VxE, tokens_BxS, axis=0)
        if c.positions == "learned":
            positions_SxE = _param(self, "positions", (c.max_len, c.d_model), (None, "embed"))
            x_BxSxE = x_BxSxE + jnp.take(positions_SxE, positions_BxS, axis=0)
        x_BxSxE = _constrain(x_BxSxE.astype(c.dtype))
        if c.scan_layers:
            if decode:
                raise ValueError("GPT: decode needs per-layer parameters; convert stacked ones with "
                                 "models.unstack_layers(params) and a config with scan_layers=False")
            x_BxSxE = self._stacked_blocks(x_BxSxE, positions_BxS, segment_ids)
        else:
            block = linen.remat(Block, static_argnums=(3,)) if c.remat else Block
            for i in range(c.num_layers):
                x_BxSxE = block(c, name=f"block_{i}")(x_BxSxE, positions_BxS, decode, segment_ids)
        x_BxSxE = _Norm(c, name="final_norm")(x_BxSxE)
        if return_hidden:
            return x_BxSxE
        if c.tie_embeddings:
            head_ExV = embedding_VxE.T
        else:
            head_ExV = _param(self, "head", (c.d_model, c.vocab_size), ("embed", "vocab"))
        if c.fused_loss and train and not decode:
            return LMHead(x_BxSxE, head_ExV.astype(c.dtype))
        logits_BxSxV = jnp.einsum("bse,ev->bsv", x_BxSxE, head_ExV.astype(c.dtype), preferred_element_type=jnp.float32)
        return linen.with_logical_constraint(logits_BxSxV, ("batch", "seq", "vocab"))

    def _stacked_blocks(self, x_BxSxE: jax.Array, positions_BxS: jax.Array,
                        segment_ids: jax.Array | None) -> jax.Array:
        """The blocks from ``params["blocks"]`` (leaves ``[L, ...]``): a scan over the
        layers, or a pipeline when the rules put the stacked layers on a mesh axis."""
        c = self.config
        if self.has_variable("params", "blocks"):
            # ``self.param`` would trace the initialiser again on every apply to
            # check the shapes (two-thirds of a scanned GPT's tracing); the same
            # check runs here against shapes worked out once per config.
            blocks = linen.meta.unbox(self.get_variable("params", "blocks"))
            _check_stacked_shapes(blocks, c)
        else:
            blocks = self.param("blocks", _init_stacked_blocks, c, x_BxSxE.shape[1])
        unbound = Block(c, parent=None)

        def apply_layer(p_layer, x, *segments):
            return unbound.apply({"params": p_layer}, x, positions_BxS, False, segments[0] if segments else None)

        per_example = () if segment_ids is None else (segment_ids,)
        axis = pipeline_lib.stage_axis()
        if axis is not None:
            return pipeline_lib.pipeline(apply_layer, blocks, x_BxSxE, per_example,
                                         stages=jax.sharding.get_abstract_mesh().shape[axis],
                                         microbatches=c.pipeline_microbatches, repeats=c.pipeline_repeats,
                                         remat=c.remat, spmd_axis_name=axis)
        layer = jax.checkpoint(apply_layer) if c.remat else apply_layer
        return jax.lax.scan(lambda x, p: (layer(p, x, *per_example), None), x_BxSxE, blocks)[0]

    @linen.nowrap
    def init(self, rngs, *args, **kwargs):
        """As ``linen.Module.init``; with ``scan_layers`` the blocks' parameters are
        those of the per-layer model from the same ``rngs``, stacked on a leading
        ``layers`` axis, so both layouts start from the same numbers."""
        if not self.config.scan_layers:
            return super().init(rngs, *args, **kwargs)
        if kwargs.get("decode"):
            raise ValueError("GPT: decode needs per-layer parameters (scan_layers=False)")
        per_layer = GPT(dataclasses.replace(self.config, scan_layers=False))
        variables = dict(per_layer.init(rngs, *args, **kwargs))
        variables["params"] = stack_layers(variables["params"], self.config.num_layers)
        return variables


def _init_stacked_blocks(rng: jax.Array, config: GPTConfig, seq_len: int) -> Any:
    """Stacked block parameters drawn layer by layer (``GPT.init`` draws them
    through the per-layer model instead; this serves other initialisers)."""
    block = Block(dataclasses.replace(config, scan_layers=False), parent=None)
    x = jnp.zeros((1, seq_len, config.d_model), config.dtype)
    init = lambda key: block.init(key, x, jnp.arange(seq_len)[None])["params"]  # noqa: E731
    names = jax.tree.map(_names, jax.eval_shape(init, rng), is_leaf=_boxed)
    values = jax.vmap(lambda key: linen.meta.unbox(init(key)))(jax.random.split(rng, config.num_layers))
    return jax.tree.map(lambda axes, v: linen.LogicallyPartitioned(v, ("layers",) + axes), names, values,
                        is_leaf=lambda n: isinstance(n, tuple))


@functools.lru_cache(maxsize=32)
def _stacked_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of the stacked block parameters ``config`` initialises."""
    return named_shapes(jax.eval_shape(lambda key: linen.meta.unbox(_init_stacked_blocks(key, config, 1)),
                                       jax.random.PRNGKey(0)))


def _check_stacked_shapes(blocks: Any, config: GPTConfig) -> None:
    """Raise unless ``blocks`` has the leaves and shapes ``config`` initialises."""
    want = _stacked_shapes(config)
    have = named_shapes(blocks)
    if have != want:
        wrong = sorted(set(have) ^ set(want)) or [k for k in want if have[k] != want[k]]
        raise ValueError(f"GPT: params['blocks'] do not fit the config (num_layers={config.num_layers}, "
                         f"d_model={config.d_model}, ...): " + "; ".join(
                             f"blocks/{k} has shape {have.get(k, 'missing')}, expected {want.get(k, 'none')}"
                             for k in wrong[:4]))


def _boxed(x: Any) -> bool:
    return isinstance(x, linen.LogicallyPartitioned)


def _names(leaf: Any) -> tuple[str | None, ...]:
    """A parameter's logical axis names (``None`` per axis when unannotated)."""
    return tuple(leaf.names) if _boxed(leaf) else (None,) * len(leaf.shape)


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Per-layer GPT parameters (``block_0`` ... ``block_{L-1}``) -> stacked
    (``blocks`` with leaves ``[L, ...]``). A boxed tree (``LogicallyPartitioned``,
    as ``init`` gives) comes back boxed, every stacked leaf named ``layers`` first."""
    missing = [f"block_{i}" for i in range(num_layers) if f"block_{i}" not in params]
    if missing:
        raise ValueError(f"stack_layers: params have no {missing[0]} (expected block_0..block_{num_layers - 1})")
    layers = [params[f"block_{i}"] for i in range(num_layers)]
    any_boxed = any(_boxed(leaf) for leaf in jax.tree.leaves(layers[0], is_leaf=_boxed))

    def stack(*leaves):
        value = jnp.stack([linen.meta.unbox(leaf) for leaf in leaves])
        # Boxed trees (from init) name every stacked leaf, norms too, so all follow the stage axis.
        return linen.LogicallyPartitioned(value, ("layers",) + _names(leaves[0])) if any_boxed else value

    out = {k: v for k, v in params.items() if not (k.startswith("block_") and k[6:].isdigit())}
    out["blocks"] = jax.tree.map(stack, *layers, is_leaf=_boxed)
    return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """Stacked GPT parameters (``blocks``, leaves ``[L, ...]``) -> per-layer
    (``block_0`` ...), for decoding and export (``scan_layers=False``)."""
    if "blocks" not in params:
        raise ValueError(f"unstack_layers: params have no 'blocks' (stacked layers); got keys {sorted(params)}")
    blocks = params["blocks"]
    if all(isinstance(leaf, np.ndarray) for leaf in jax.tree.leaves(blocks)):
        layers = _split_layers(blocks)  # host arrays: numpy views, nothing compiled
    else:
        layers = _split_layers_jit(blocks)  # one program, not one op per leaf and layer
    out = {k: v for k, v in params.items() if k != "blocks"}
    out.update((f"block_{i}", layer) for i, layer in enumerate(layers))
    return out


def _split_layers(blocks: Any) -> list[Any]:
    """``[L, ...]`` leaves -> L trees of ``[...]`` leaves."""
    L = jax.tree.leaves(blocks)[0].shape[0]
    return [jax.tree.map(lambda p, i=i: p[i], blocks) for i in range(L)]


_split_layers_jit = jax.jit(_split_layers)


def lm_loss(outputs: jax.Array | LMHead, batch: Mapping[str, jax.Array], *,
            implementation: str = "auto") -> jax.Array:
    """Next-token cross-entropy in nats, averaged over counted tokens.

    ``outputs`` is logits ``[B, S, V]`` or an ``LMHead`` (``fused_loss``), for
    which ``ops.linear_cross_entropy`` (``implementation``) computes the same
    loss without materialising the logits. ``batch["targets"]`` ``[B, S]``
    (``-100`` ignored); rows whose ``batch["mask"]`` ``[B]`` is False are left out.
    """
    targets_BxS = batch["targets"]
    keep_BxS = None
    if "mask" in batch:
        keep_BxS = jnp.broadcast_to(batch["mask"][:, None], targets_BxS.shape)
    if isinstance(outputs, LMHead):
        if keep_BxS is not None:
            targets_BxS = jnp.where(keep_BxS, targets_BxS, -100)
        hidden_TxE = outputs.hidden_BxSxE.reshape(-1, outputs.hidden_BxSxE.shape[-1])
        return ops.linear_cross_entropy(hidden_TxE, outputs.head_ExV, targets_BxS.reshape(-1),
                                        ignore_index=-100, implementation=implementation)
    return ops.softmax_cross_entropy(outputs, targets_BxS, mask=keep_BxS)


def init_cache(model: GPT, batch_size: int) -> Any:
    """An empty KV cache (the ``"cache"`` collection) for ``batch_size``
    sequences: per layer keys and values ``[B, max_len, K, D]``, and each
    row's position ``[B]``, all zeros. Built from the shapes alone (``jax.eval_shape``), so
    no parameter is initialised on the way."""
    one_BxS = jnp.zeros((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), one_BxS, decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


@functools.partial(jax.jit, static_argnums=0)
def _decode_step(model: GPT, params: Any, cache: Any, token_Bx1: jax.Array) -> tuple[jax.Array, Any]:
    # Module level, the model static: compiled once per model and batch size,
    # not once per generate call.
    logits, updates = model.apply({"params": params, "cache": cache}, token_Bx1, decode=True, mutable=["cache"])
    return logits[:, -1], updates["cache"]


def generate(model: GPT, params: Any, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> jax.Array:
    """Samples ``max_new_tokens`` after ``prompt`` ``[B, P]`` with a KV cache.

    The prompt is fed one token at a time (each step is one jitted decode),
    then tokens are drawn by ``sampling.Sampler`` (``temperature=0`` is
    greedy; ``top_k``/``top_p`` restrict to the likeliest tokens), the
    sampler an exported model's ``Generator`` uses: the same seed gives the
    same tokens. Returns ``[B, P + max_new_tokens]``.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    B, P = prompt.shape
    if P < 1 or P + max_new_tokens > model.config.max_len:
        raise ValueError(f"generate: need 1 <= prompt length and prompt + new tokens <= max_len "
                         f"{model.config.max_len}, got {P} + {max_new_tokens}")
    sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    cache = init_cache(model, B)
    tokens = [prompt[:, i] for i in range(P)]
    for i in range(P):
        logits, cache = _decode_step(model, params, cache, prompt[:, i:i + 1])
    for _ in range(max_new_tokens):
        token = sampler(logits)
        tokens.append(token)
        logits, cache = _decode_step(model, params, cache, token[:, None])
    return jnp.stack(tokens, axis=1)


# The modules of a GPT that int8 quantization rewrites: the blocks'
# projections and MLPs. The tied embedding also feeds a gather, which qwix
# cannot take quantized, and the products of two activations inside
# attention (module ``attention/core``) stay in float.
GPT_QUANTIZED_MODULES = r"block_\d+/(attention|mlp)"
