"""BERT encoders (``BertModel``): learned absolute positions and token types,
post-LayerNorm layers, biases on every projection, an optional pooler.

Files saved from a ``BertFor*`` model prefix every name with ``bert.``,
which is stripped on reading; their task heads (``cls.*``, ``classifier.*``)
are not part of the encoder and are reported as unexpected tensors, like
any other tensor we would drop. A checkpoint without ``pooler.*`` tensors
(``add_pooling_layer=False``, e.g. the encoder of ``BertForMaskedLM``)
gives a model without a pooler; ``config.json`` records it as
``add_pooling_layer``, which ``transformers`` ignores.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

from lepton_jax.convert.families import Family, Tensor, linear_in, linear_out, require, reshaped, unsupported
from lepton_jax.models.bert import BertConfig, BertEncoder

WHERE = "convert bert"
# config.json hidden_act -> our activation; the tanh forms are one function.
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu"}
TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
POOLER_TENSORS = ("pooler.dense.weight", "pooler.dense.bias")


def build(hf: Mapping[str, Any]) -> BertEncoder:
    unsupported(hf, {"position_embedding_type": ("absolute",), "is_decoder": (False,),
                     "add_cross_attention": (False,), "hidden_act": tuple(HF_ACTIVATIONS)}, WHERE)
    d_model, heads = require(hf, "hidden_size", WHERE), require(hf, "num_attention_heads", WHERE)
    if d_model % heads:
        raise ValueError(f"{WHERE}: config.json hidden_size={d_model} is not a multiple of "
                         f"num_attention_heads={heads}")
    return BertEncoder(BertConfig(vocab_size=require(hf, "vocab_size", WHERE),
                                  max_len=require(hf, "max_position_embeddings", WHERE),
                                  type_vocab_size=int(hf.get("type_vocab_size", 2)),
                                  num_layers=require(hf, "num_hidden_layers", WHERE), num_heads=heads,
                                  d_model=d_model, d_ff=require(hf, "intermediate_size", WHERE),
                                  norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                                  activation=HF_ACTIVATIONS[hf.get("hidden_act", "gelu")],
                                  pooler=bool(hf.get("add_pooling_layer", True))))


def complete_config(hf: Mapping[str, Any], names: Collection[str]) -> Mapping[str, Any]:
    """``config.json`` with ``add_pooling_layer=False`` when the checkpoint's
    (unprefixed) tensor ``names`` have no pooler: config.json does not say."""
    if "add_pooling_layer" in hf or any(name in names for name in POOLER_TENSORS):
        return hf
    return {**hf, "add_pooling_layer": False}


def owns(model: Any) -> bool:
    return isinstance(model, BertEncoder)


def hf_config(model: BertEncoder) -> dict[str, Any]:
    c = model.config
    return {"model_type": "bert", "vocab_size": c.vocab_size, "max_position_embeddings": c.max_len,
            "type_vocab_size": c.type_vocab_size, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "hidden_size": c.d_model, "intermediate_size": c.d_ff,
            "layer_norm_eps": c.norm_eps, "hidden_act": TO_HF_ACTIVATION[c.activation], "is_decoder": False,
            "add_cross_attention": False, "add_pooling_layer": c.pooler}


def _norm(hf_name: str, path: str, E: int) -> list[Tensor]:
    return [Tensor(f"{hf_name}.weight", f"{path}/scale", (E,)), Tensor(f"{hf_name}.bias", f"{path}/bias", (E,))]


def tensors(model: BertEncoder) -> list[Tensor]:
    c = model.config
    E, F, H, D = c.d_model, c.d_ff, c.num_heads, c.head_dim
    out = [Tensor("embeddings.word_embeddings.weight", "word_embeddings", (c.vocab_size, E)),
           Tensor("embeddings.position_embeddings.weight", "position_embeddings", (c.max_len, E)),
           Tensor("embeddings.token_type_embeddings.weight", "token_type_embeddings", (c.type_vocab_size, E)),
           *_norm("embeddings.LayerNorm", "embedding_norm", E)]
    for i in range(c.num_layers):
        h, b = f"encoder.layer.{i}.", f"block_{i}/"
        for name in ("query", "key", "value"):
            out += [Tensor(f"{h}attention.self.{name}.weight", f"{b}attention/{name}", (E, E), *linear_in((E, H, D))),
                    Tensor(f"{h}attention.self.{name}.bias", f"{b}attention/{name}_bias", (E,), *reshaped((H, D)))]
        out += [Tensor(f"{h}attention.output.dense.weight", f"{b}attention/out", (E, E), *linear_out((H, D, E))),
                Tensor(f"{h}attention.output.dense.bias", f"{b}attention/out_bias", (E,)),
                *_norm(f"{h}attention.output.LayerNorm", f"{b}attention_norm", E),
                Tensor(f"{h}intermediate.dense.weight", f"{b}mlp/w_in", (F, E), *linear_in((E, F))),
                Tensor(f"{h}intermediate.dense.bias", f"{b}mlp/w_in_bias", (F,)),
                Tensor(f"{h}output.dense.weight", f"{b}mlp/w_out", (E, F), *linear_in((F, E))),
                Tensor(f"{h}output.dense.bias", f"{b}mlp/w_out_bias", (E,)),
                *_norm(f"{h}output.LayerNorm", f"{b}mlp_norm", E)]
    if c.pooler:
        out += [Tensor("pooler.dense.weight", "pooler", (E, E), *linear_in((E, E))),
                Tensor("pooler.dense.bias", "pooler_bias", (E,))]
    return out


FAMILY = Family(name="bert", model_types=("bert",), architecture="BertModel", build=build, tensors=tensors,
                hf_config=hf_config, owns=owns, read_prefixes=("bert.",),
                # Index buffers that some exporters (and older transformers) save.
                ignored=r"^embeddings\.(position_ids|token_type_ids)$", complete_config=complete_config)
