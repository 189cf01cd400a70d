"""A GPT-style decoder annotated with logical axes for SPMD training.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``,
``kv_heads``, ``head_dim``, ``vocab``) through
``flax.linen.with_logical_partitioning``, and activations are constrained to
``("batch", "seq", "embed")`` between blocks, so ``lepton_jax.parallel``
rules decide data / FSDP / tensor parallelism. Attention and norms go
through ``lepton_jax.ops`` (``implementation=`` picks the kernels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as linen
import jax
import jax.numpy as jnp

from lepton_jax import nn, ops

ACTIVATION = ("batch", "seq", "embed")


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

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _param(module: linen.Module, name: str, shape, axes, init=None) -> jax.Array:
    init = init or linen.initializers.normal(stddev=0.02)
    return module.param(name, linen.with_logical_partitioning(init, axes), shape, jnp.float32)


def _constrain(x: jax.Array) -> jax.Array:
    return linen.with_logical_constraint(x, ACTIVATION)


def _rotary(x_BxSxHxD: jax.Array, positions_S: jax.Array) -> jax.Array:
    D = x_BxSxHxD.shape[-1]
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    angles_SxD2 = positions_S[:, None].astype(jnp.float32) * inv_freq[None]
    sin, cos = jnp.sin(angles_SxD2)[None, :, None], jnp.cos(angles_SxD2)[None, :, None]
    x1, x2 = jnp.split(x_BxSxHxD.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x_BxSxHxD.dtype)


class _Norm(linen.Module):
    config: GPTConfig

    @linen.compact
    def __call__(self, x):
        if self.config.norm == "rms":
            return nn.RMSNorm(implementation=self.config.norm_implementation)(x)
        return nn.LayerNorm(implementation=self.config.norm_implementation)(x)


class Attention(linen.Module):
    config: GPTConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array) -> jax.Array:
        c = self.config
        E, H, K, D = c.d_model, c.num_heads, c.kv_heads, c.head_dim
        w_q_ExHxD = _param(self, "query", (E, H, D), ("embed", "heads", "head_dim"))
        w_k_ExKxD = _param(self, "key", (E, K, D), ("embed", "kv_heads", "head_dim"))
        w_v_ExKxD = _param(self, "value", (E, K, D), ("embed", "kv_heads", "head_dim"))
        w_o_HxDxE = _param(self, "out", (H, D, E), ("heads", "head_dim", "embed"),
                           linen.initializers.normal(stddev=0.02 / (2 * c.num_layers) ** 0.5))
        x = x_BxSxE.astype(c.dtype)
        q_BxSxHxD = jnp.einsum("bse,ehd->bshd", x, w_q_ExHxD.astype(c.dtype))
        k_BxSxKxD = jnp.einsum("bse,ekd->bskd", x, w_k_ExKxD.astype(c.dtype))
        v_BxSxKxD = jnp.einsum("bse,ekd->bskd", x, w_v_ExKxD.astype(c.dtype))
        if c.positions == "rotary":
            positions_S = jnp.arange(x.shape[1])
            q_BxSxHxD, k_BxSxKxD = _rotary(q_BxSxHxD, positions_S), _rotary(k_BxSxKxD, positions_S)
        out_BxSxHxD = ops.attention(q_BxSxHxD, k_BxSxKxD, v_BxSxKxD, causal=True,
                                    implementation=c.attention_implementation)
        return jnp.einsum("bshd,hde->bse", out_BxSxHxD, w_o_HxDxE.astype(c.dtype))


class MLPBlock(linen.Module):
    config: GPTConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array) -> jax.Array:
        c = self.config
        x = x_BxSxE.astype(c.dtype)
        w_in_ExF = _param(self, "w_in", (c.d_model, c.d_ff), ("embed", "mlp"))
        h_BxSxF = x @ w_in_ExF.astype(c.dtype)
        if c.mlp == "swiglu":
            w_gate_ExF = _param(self, "w_gate", (c.d_model, c.d_ff), ("embed", "mlp"))
            h_BxSxF = jax.nn.silu(x @ w_gate_ExF.astype(c.dtype)) * h_BxSxF
        else:
            h_BxSxF = jax.nn.gelu(h_BxSxF, approximate=True)
        h_BxSxF = linen.with_logical_constraint(h_BxSxF, ("batch", "seq", "mlp"))
        w_out_FxE = _param(self, "w_out", (c.d_ff, c.d_model), ("mlp", "embed"),
                           linen.initializers.normal(stddev=0.02 / (2 * c.num_layers) ** 0.5))
        return h_BxSxF @ w_out_FxE.astype(c.dtype)


class Block(linen.Module):
    config: GPTConfig

    @linen.compact
    def __call__(self, x_BxSxE: jax.Array) -> jax.Array:
        x_BxSxE = x_BxSxE + Attention(self.config)(_Norm(self.config)(x_BxSxE)).astype(x_BxSxE.dtype)
        x_BxSxE = x_BxSxE + MLPBlock(self.config)(_Norm(self.config)(x_BxSxE)).astype(x_BxSxE.dtype)
        return _constrain(x_BxSxE)


class GPT(linen.Module):
    """Decoder-only transformer: ``tokens [B, S] int -> logits [B, S, vocab]`` (fp32).

    ``return_hidden=True`` returns the final normalized hidden states
    ``[B, S, d_model]`` instead (for a fused linear cross-entropy).
    """

    config: GPTConfig

    @linen.compact
    def __call__(self, tokens_BxS: jax.Array, *, train: bool = False, return_hidden: bool = False) -> jax.Array:
        c = self.config
        if tokens_BxS.ndim != 2 or not jnp.issubdtype(tokens_BxS.dtype, jnp.integer):
            raise ValueError(f"GPT: tokens must be integer [batch, seq], got {tokens_BxS.dtype} {tokens_BxS.shape}")
        if tokens_BxS.shape[1] > c.max_len and c.positions == "learned":
            raise ValueError(f"GPT: sequence length {tokens_BxS.shape[1]} exceeds max_len {c.max_len}")
        embedding_VxE = _param(self, "embedding", (c.vocab_size, c.d_model), ("vocab", "embed"))
        x_BxSxE = jnp.take(embedding_VxE, tokens_BxS, axis=0)
        if c.positions == "learned":
            positions_SxE = _param(self, "positions", (c.max_len, c.d_model), (None, "embed"))
            x_BxSxE = x_BxSxE + positions_SxE[None, :tokens_BxS.shape[1]]
        x_BxSxE = _constrain(x_BxSxE.astype(c.dtype))
        block = linen.remat(Block) if c.remat else Block
        for i in range(c.num_layers):
            x_BxSxE = block(c, name=f"block_{i}")(x_BxSxE)
        x_BxSxE = _Norm(c, name="final_norm")(x_BxSxE)
        if return_hidden:
            return x_BxSxE
        if c.tie_embeddings:
            head_ExV = embedding_VxE.T
        else:
            head_ExV = _param(self, "head", (c.d_model, c.vocab_size), ("embed", "vocab"))
        logits_BxSxV = jnp.einsum("bse,ev->bsv", x_BxSxE, head_ExV.astype(c.dtype), preferred_element_type=jnp.float32)
        return linen.with_logical_constraint(logits_BxSxV, ("batch", "seq", "vocab"))


def lm_loss(logits_BxSxV: jax.Array, batch: Mapping[str, jax.Array]):
    """Next-token cross-entropy; ``batch["targets"]`` ``[B, S]`` (``-100`` ignored)."""
    return ops.softmax_cross_entropy(logits_BxSxV, batch["targets"])
