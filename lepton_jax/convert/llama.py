"""Llama-family decoders (``LlamaForCausalLM``): RMSNorm, SwiGLU, rotary
embeddings (``rope_theta``, Llama 3's ``rope_scaling``), grouped-query
attention, a tied or untied output head.

Both ``config.json`` layouts are read: the older top-level ``rope_theta``
and ``rope_scaling`` keys most Hub files carry, and transformers 5's
``rope_parameters`` block.
"""

from __future__ import annotations

from typing import Any, Mapping

from lepton_jax.convert.families import Family, Tensor, linear_in, linear_out, require, unsupported
from lepton_jax.models.gpt import GPT, GPTConfig, RopeScaling

WHERE = "convert llama"


def rope(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, rope_scaling)`` from either ``config.json`` layout."""
    parameters = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {}) or parameters
    theta = float(parameters.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{WHERE}: config.json rope type {kind!r} is not supported (supported: 'default', 'llama3')")
    try:
        return theta, RopeScaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                                  high_freq_factor=float(scaling["high_freq_factor"]),
                                  original_max_len=int(scaling["original_max_position_embeddings"]))
    except KeyError as missing:
        raise ValueError(f"{WHERE}: config.json llama3 rope scaling has no {missing}") from None


def build(hf: Mapping[str, Any]) -> GPT:
    unsupported(hf, {"hidden_act": ("silu",), "attention_bias": (False,), "mlp_bias": (False,),
                     "pretraining_tp": (1,)}, WHERE)
    theta, scaling = rope(hf)
    d_model, heads = require(hf, "hidden_size", WHERE), require(hf, "num_attention_heads", WHERE)
    return GPT(GPTConfig(vocab_size=require(hf, "vocab_size", WHERE),
                         max_len=require(hf, "max_position_embeddings", WHERE),
                         num_layers=require(hf, "num_hidden_layers", WHERE), num_heads=heads,
                         num_kv_heads=hf.get("num_key_value_heads") or heads, d_model=d_model,
                         d_ff=require(hf, "intermediate_size", WHERE), positions="rotary", mlp="swiglu", norm="rms",
                         norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                         tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=theta,
                         rope_scaling=scaling, head_size=hf.get("head_dim") or d_model // heads))


def owns(model: Any) -> bool:
    c = getattr(model, "config", None)
    return (isinstance(model, GPT) and c.positions == "rotary" and c.norm == "rms" and c.mlp == "swiglu"
            and not c.use_bias)


def hf_config(model: GPT) -> dict[str, Any]:
    c = model.config
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope_parameters.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                               high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_len)
    return {"model_type": "llama", "vocab_size": c.vocab_size, "max_position_embeddings": c.max_len,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads, "num_key_value_heads": c.kv_heads,
            "hidden_size": c.d_model, "intermediate_size": c.d_ff, "head_dim": c.head_dim, "hidden_act": "silu",
            "rms_norm_eps": c.norm_eps or 1e-6, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
            "mlp_bias": False, "rope_parameters": rope_parameters}


def tensors(model: GPT) -> list[Tensor]:
    c = model.config
    E, F, H, K, D = c.d_model, c.d_ff, c.num_heads, c.kv_heads, c.head_dim
    out = [Tensor("model.embed_tokens.weight", "embedding", (c.vocab_size, E)),
           Tensor("model.norm.weight", "final_norm/RMSNorm_0/scale", (E,))]
    if not c.tie_embeddings:
        out.append(Tensor("lm_head.weight", "head", (c.vocab_size, E), *linear_in((E, c.vocab_size))))
    for i in range(c.num_layers):
        h, b = f"model.layers.{i}.", f"block_{i}/"
        out += [Tensor(f"{h}input_layernorm.weight", f"{b}attention_norm/RMSNorm_0/scale", (E,)),
                Tensor(f"{h}post_attention_layernorm.weight", f"{b}mlp_norm/RMSNorm_0/scale", (E,)),
                Tensor(f"{h}self_attn.q_proj.weight", f"{b}attention/query", (H * D, E), *linear_in((E, H, D))),
                Tensor(f"{h}self_attn.k_proj.weight", f"{b}attention/key", (K * D, E), *linear_in((E, K, D))),
                Tensor(f"{h}self_attn.v_proj.weight", f"{b}attention/value", (K * D, E), *linear_in((E, K, D))),
                Tensor(f"{h}self_attn.o_proj.weight", f"{b}attention/out", (E, H * D), *linear_out((H, D, E))),
                Tensor(f"{h}mlp.gate_proj.weight", f"{b}mlp/w_gate", (F, E), *linear_in((E, F))),
                Tensor(f"{h}mlp.up_proj.weight", f"{b}mlp/w_in", (F, E), *linear_in((E, F))),
                Tensor(f"{h}mlp.down_proj.weight", f"{b}mlp/w_out", (E, F), *linear_in((F, E)))]
    return out


FAMILY = Family(name="llama", model_types=("llama",), architecture="LlamaForCausalLM", build=build, tensors=tensors,
                hf_config=hf_config, owns=owns,
                # Rotary tables some exporters save as buffers.
                ignored=r"\.rotary_emb\.inv_freq$")
