"""A BERT-style bidirectional encoder annotated with logical axes.

Word + learned absolute position + token type embeddings and a LayerNorm,
then post-LayerNorm blocks (``x = LN(x + attention(x))``, ``x = LN(x +
mlp(x))``) with biases on every projection, and an optional pooler
(``tanh(Dense(hidden[:, 0]))``). Every parameter carries the GPT's logical
axis names (``embed``, ``heads``, ``head_dim``, ``mlp``, ``vocab``) and
activations are constrained to ``("batch", "seq", "embed")``, so
``lepton_jax.parallel`` rules shard it; attention goes through
``ops.attention`` with padding given as segment ids.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax import nn
from lepton_jax.models.gpt import AttentionCore
from lepton_jax.nn._checks import cast

ACTIVATION = ("batch", "seq", "embed")
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # BERT's "gelu": the exact erf form
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """A BERT encoder's shape (defaults: bert-base-uncased) and how it computes."""

    vocab_size: int = 30522
    max_len: int = 512
    type_vocab_size: int = 2
    num_layers: int = 12
    num_heads: int = 12
    d_model: int = 768
    d_ff: int = 3072
    norm_eps: float = 1e-12
    activation: str = "gelu"  # "gelu" (exact erf), "gelu_tanh", "relu" or "silu"
    dtype: Any = jnp.float32  # compute dtype; params stay fp32
    attention_implementation: str = "auto"
    norm_implementation: str = "auto"
    pooler: bool = True  # tanh(Dense(CLS)) on top (Hugging Face's add_pooling_layer)

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"BertConfig: activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"BertConfig: d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _param(module: linen.Module, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
           init: Any = None) -> jax.Array:
    return nn.logical_param(module, name, init or linen.initializers.normal(stddev=0.02), shape, axes)


def _bias(module: linen.Module, name: str, y: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """``y + bias`` over the trailing ``axes`` (the bias stored as ``{name}_bias``)."""
    bias = nn.logical_param(module, f"{name}_bias", linen.initializers.zeros_init(), y.shape[-len(axes):], axes)
    return y + cast(bias, y.dtype)


def _norm(config: BertConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(eps=config.norm_eps, implementation=config.norm_implementation, name=name)


class SelfAttention(linen.Module):
    """Bidirectional self-attention; ``segments`` ``(q_ids [B, S], kv_ids [B, S])``
    masks the padded keys."""

    config: BertConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array, segments: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        c = self.config
        E, H, D = c.d_model, c.num_heads, c.head_dim
        x = x_BxSxE.astype(c.dtype)
        projected = {}
        for name in ("query", "key", "value"):
            w_ExHxD = _param(self, name, (E, H, D), ("embed", "heads", "head_dim"))
            projected[name] = _bias(self, name, jnp.einsum("bse,ehd->bshd", x, cast(w_ExHxD, c.dtype)),
                                    ("heads", "head_dim"))
        out_BxSxHxD = AttentionCore(name="core")(projected["query"], projected["key"], projected["value"],
                                                  causal=False, segment_ids=segments,
                                                  implementation=c.attention_implementation)
        w_o_HxDxE = _param(self, "out", (H, D, E), ("heads", "head_dim", "embed"))
        return _bias(self, "out", jnp.einsum("bshd,hde->bse", out_BxSxHxD, cast(w_o_HxDxE, c.dtype)), ("embed",))


class MLPBlock(linen.Module):
    config: BertConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array) -> jax.Array:
        c = self.config
        x = x_BxSxE.astype(c.dtype)
        w_in_ExF = _param(self, "w_in", (c.d_model, c.d_ff), ("embed", "mlp"))
        h_BxSxF = _bias(self, "w_in", jnp.einsum("bse,ef->bsf", x, cast(w_in_ExF, c.dtype)), ("mlp",))
        h_BxSxF = linen.with_logical_constraint(ACTIVATIONS[c.activation](h_BxSxF), ("batch", "seq", "mlp"))
        w_out_FxE = _param(self, "w_out", (c.d_ff, c.d_model), ("mlp", "embed"))
        return _bias(self, "w_out", jnp.einsum("bsf,fe->bse", h_BxSxF, cast(w_out_FxE, c.dtype)), ("embed",))


class Block(linen.Module):
    """One post-LayerNorm encoder layer."""

    config: BertConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array, segments: tuple[jax.Array, jax.Array] | None) -> jax.Array:
        c = self.config
        x_BxSxE = _norm(c, "attention_norm")(x_BxSxE + SelfAttention(c, name="attention")(x_BxSxE, segments))
        x_BxSxE = _norm(c, "mlp_norm")(x_BxSxE + MLPBlock(c, name="mlp")(x_BxSxE))
        return linen.with_logical_constraint(x_BxSxE, ACTIVATION)


def _check_inputs(ids_BxT: jax.Array, mask_BxT: jax.Array | None, types_BxT: jax.Array | None,
                  config: BertConfig) -> None:
    if ids_BxT.ndim != 2 or not jnp.issubdtype(ids_BxT.dtype, jnp.integer):
        raise ValueError(f"BertEncoder: input_ids must be integer [batch, seq], got {ids_BxT.dtype} {ids_BxT.shape}")
    for name, value in (("attention_mask", mask_BxT), ("token_type_ids", types_BxT)):
        if value is not None and value.shape != ids_BxT.shape:
            raise ValueError(f"BertEncoder: {name} must have the input_ids' shape {ids_BxT.shape}, got {value.shape}")
    if types_BxT is not None and not jnp.issubdtype(types_BxT.dtype, jnp.integer):
        raise ValueError(f"BertEncoder: token_type_ids must be integer, got {types_BxT.dtype}")
    if ids_BxT.shape[1] > config.max_len:
        raise ValueError(f"BertEncoder: sequence length {ids_BxT.shape[1]} exceeds max_len {config.max_len}")


class BertEncoder(linen.Module):
    """Bidirectional encoder: ``input_ids [B, T] int`` -> last hidden states ``[B, T, d_model]`` (fp32).

    ``attention_mask`` ``[B, T]`` (1 or True for real tokens, 0 for padding):
    no token attends to a padded one (padded positions still get outputs,
    which callers ignore). ``token_type_ids`` ``[B, T]`` (default all 0).
    ``return_pooled=True`` returns the pooler output ``tanh(Dense(hidden[:,
    0]))`` ``[B, d_model]`` instead (needs ``config.pooler``). ``train`` is
    accepted for the trainer's calling convention; there is no dropout, so
    training and evaluation compute the same function.
    """

    config: BertConfig

    @linen.compact
    def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
                 token_type_ids: jax.Array | None = None, train: bool = False,
                 return_pooled: bool = False) -> jax.Array:
        del train  # no dropout: see the docstring
        c = self.config
        ids_BxT, mask_BxT, types_BxT = (None if x is None else jnp.asarray(x)
                                        for x in (input_ids, attention_mask, token_type_ids))
        _check_inputs(ids_BxT, mask_BxT, types_BxT, c)
        if return_pooled and not c.pooler:
            raise ValueError("BertEncoder: return_pooled=True needs a pooler, and this config has pooler=False")
        T = ids_BxT.shape[1]
        types_BxT = jnp.zeros_like(ids_BxT) if types_BxT is None else types_BxT
        words_VxE = _param(self, "word_embeddings", (c.vocab_size, c.d_model), ("vocab", "embed"))
        positions_PxE = _param(self, "position_embeddings", (c.max_len, c.d_model), (None, "embed"))
        types_YxE = _param(self, "token_type_embeddings", (c.type_vocab_size, c.d_model), (None, "embed"))
        x_BxTxE = (jnp.take(words_VxE, ids_BxT, axis=0) + positions_PxE[None, :T]
                   + jnp.take(types_YxE, types_BxT, axis=0))
        x_BxTxE = linen.with_logical_constraint(_norm(c, "embedding_norm")(x_BxTxE).astype(c.dtype), ACTIVATION)
        segments = None
        if mask_BxT is not None:
            # Every query is in segment 1; a key is seen only when its mask is 1.
            kv_ids_BxT = (mask_BxT != 0).astype(jnp.int32)
            segments = (jnp.ones_like(kv_ids_BxT), kv_ids_BxT)
        for i in range(c.num_layers):
            x_BxTxE = Block(c, name=f"block_{i}")(x_BxTxE, segments)
        if c.pooler:
            # Declared on every call, so init makes the pooler whether or not it is used.
            pooler_ExE = _param(self, "pooler", (c.d_model, c.d_model), ("embed", None))
            pooler_bias_E = nn.logical_param(self, "pooler_bias", linen.initializers.zeros_init(), (c.d_model,),
                                             (None,))
            if return_pooled:
                cls_BxE = x_BxTxE[:, 0].astype(jnp.float32)
                return jnp.tanh(cls_BxE @ pooler_ExE.astype(jnp.float32) + pooler_bias_E.astype(jnp.float32))
        return x_BxTxE.astype(jnp.float32)


def mean_pool(hidden_BxTxD: jax.Array, attention_mask_BxT: jax.Array) -> jax.Array:
    """The mean of ``hidden`` over the real tokens (``attention_mask`` != 0)
    of each row: ``[B, T, D]``, ``[B, T]`` -> ``[B, D]`` fp32; a row with no
    real token gives zeros."""
    if jnp.ndim(hidden_BxTxD) != 3 or jnp.shape(attention_mask_BxT) != jnp.shape(hidden_BxTxD)[:2]:
        raise ValueError(f"mean_pool: need hidden [batch, seq, dim] and attention_mask [batch, seq], got "
                         f"{jnp.shape(hidden_BxTxD)} and {jnp.shape(attention_mask_BxT)}")
    keep_BxT = (jnp.asarray(attention_mask_BxT) != 0).astype(jnp.float32)
    total_BxD = jnp.einsum("btd,bt->bd", jnp.asarray(hidden_BxTxD).astype(jnp.float32), keep_BxT)
    return total_BxD / jnp.maximum(keep_BxT.sum(axis=1, keepdims=True), 1.0)
