"""GPT-2 (``GPT2LMHeadModel``): learned positions, pre-LayerNorm, biases on
every projection, the tanh GELU, a tied output head.

Hugging Face stores the attention and MLP weights as ``Conv1D`` (``[in,
out]``, our layout) and the three attention projections fused in ``c_attn``
``[E, 3E]``.
"""

from __future__ import annotations

from typing import Any, Mapping

from lepton_jax.convert.families import Family, Tensor, require, reshaped, unsupported
from lepton_jax.models.gpt import GPT, GPTConfig

WHERE = "convert gpt2"


def build(hf: Mapping[str, Any]) -> GPT:
    unsupported(hf, {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_weights": (True,),
                     "scale_attn_by_inverse_layer_idx": (False,), "reorder_and_upcast_attn": (False,),
                     "add_cross_attention": (False,), "tie_word_embeddings": (True,)}, WHERE)
    d_model = require(hf, "n_embd", WHERE)
    return GPT(GPTConfig(vocab_size=require(hf, "vocab_size", WHERE), max_len=require(hf, "n_positions", WHERE),
                         num_layers=require(hf, "n_layer", WHERE), num_heads=require(hf, "n_head", WHERE),
                         d_model=d_model, d_ff=hf.get("n_inner") or 4 * d_model, positions="learned", mlp="gelu",
                         norm="layer", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), tie_embeddings=True,
                         use_bias=True))


def owns(model: Any) -> bool:
    c = getattr(model, "config", None)
    return (isinstance(model, GPT) and c.positions == "learned" and c.norm == "layer" and c.mlp == "gelu"
            and c.use_bias and c.tie_embeddings and c.kv_heads == c.num_heads and c.head_dim * c.num_heads == c.d_model)


def hf_config(model: GPT) -> dict[str, Any]:
    c = model.config
    return {"model_type": "gpt2", "vocab_size": c.vocab_size, "n_positions": c.max_len, "n_layer": c.num_layers,
            "n_head": c.num_heads, "n_embd": c.d_model, "n_inner": c.d_ff, "activation_function": "gelu_new",
            "layer_norm_epsilon": c.norm_eps or 1e-5, "tie_word_embeddings": True}


def tensors(model: GPT) -> list[Tensor]:
    c = model.config
    E, F, H, D = c.d_model, c.d_ff, c.num_heads, c.head_dim
    out = [Tensor("wte.weight", "embedding", (c.vocab_size, E)), Tensor("wpe.weight", "positions", (c.max_len, E)),
           Tensor("ln_f.weight", "final_norm/LayerNorm_0/scale", (E,)),
           Tensor("ln_f.bias", "final_norm/LayerNorm_0/bias", (E,))]
    for i in range(c.num_layers):
        h, b = f"h.{i}.", f"block_{i}/"
        for hf_norm, norm in (("ln_1", "attention_norm"), ("ln_2", "mlp_norm")):
            out += [Tensor(f"{h}{hf_norm}.weight", f"{b}{norm}/LayerNorm_0/scale", (E,)),
                    Tensor(f"{h}{hf_norm}.bias", f"{b}{norm}/LayerNorm_0/bias", (E,))]
        # c_attn [E, 3E] holds q, k, v side by side: each is one third of it.
        for which, name in enumerate(("query", "key", "value")):
            out += [Tensor(f"{h}attn.c_attn.weight", f"{b}attention/{name}", (E, 3 * E),
                           lambda w: w.reshape(E, H, D), lambda w: w.reshape(E, E), part=(which, 3)),
                    Tensor(f"{h}attn.c_attn.bias", f"{b}attention/{name}_bias", (3 * E,), *reshaped((H, D)),
                           part=(which, 3))]
        out += [Tensor(f"{h}attn.c_proj.weight", f"{b}attention/out", (E, E), lambda w: w.reshape(H, D, E),
                       lambda w: w.reshape(E, E)),
                Tensor(f"{h}attn.c_proj.bias", f"{b}attention/out_bias", (E,)),
                Tensor(f"{h}mlp.c_fc.weight", f"{b}mlp/w_in", (E, F)),
                Tensor(f"{h}mlp.c_fc.bias", f"{b}mlp/w_in_bias", (F,)),
                Tensor(f"{h}mlp.c_proj.weight", f"{b}mlp/w_out", (F, E)),
                Tensor(f"{h}mlp.c_proj.bias", f"{b}mlp/w_out_bias", (E,))]
    return out


FAMILY = Family(name="gpt2", model_types=("gpt2",), architecture="GPT2LMHeadModel", build=build, tensors=tensors,
                hf_config=hf_config, owns=owns, prefix="transformer.",
                # The causal-mask buffers of old checkpoints, and the tied head.
                ignored=r"^h\.\d+\.attn\.(bias|masked_bias)$|^lm_head\.weight$")
