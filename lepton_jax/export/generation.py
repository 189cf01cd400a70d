"""Autoregressive generation from an export: a GPT's one-token decode step
with its KV cache as explicit inputs and outputs, serialized next to the
model (``decode.jaxexport``) and described in ``signature.json``.

``export_decoder`` writes it (needs the model's code); ``loader.Generator``
runs it with jax and numpy only.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax._pytree import path_str
from lepton_jax.export import loader
from lepton_jax.export.model_dir import _plain_dicts
from lepton_jax.models import init_cache

DECODER_FILE = "decode.jaxexport"


def export_decoder(version_dir: str | os.PathLike, model: Any, variables: Any, *,
                   platforms: Sequence[str] = ("cpu", "cuda", "tpu"), tokenizer: str = "bytes",
                   rebuild: Callable[[Any], Any] | None = None) -> str:
    """Adds a decode step to an exported version of a ``models.GPT``.

    ``variables`` must be the same params tree the version was exported with
    (``{"params": ...}``): the decoder reads the same ``params.npz``. The step
    is ``(variables, token int32[b, 1], *cache) -> (logits float32[b, vocab],
    *cache)``; the cache leaves (keys/values ``[b, max_len, kv_heads,
    head_dim]`` per layer and each row's position ``[b]``) are listed in ``signature.json``
    under ``"generation"``. ``rebuild`` turns the stored variables into the
    tree ``model.apply`` takes, for a quantized model whose export stores them
    flat (``QuantizedModel.flat_variables``). Returns the decoder file's path.
    """
    version_dir = os.fspath(version_dir)
    with open(os.path.join(version_dir, loader.SIGNATURE_FILE), encoding="utf-8") as f:
        signature = json.load(f)
    variables = _plain_dicts(variables)
    cache = jax.eval_shape(lambda: init_cache(model, 1))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(cache)

    def decode_step(variables, token_Bx1, *cache_leaves):
        state = jax.tree_util.tree_unflatten(treedef, cache_leaves)
        variables = rebuild(variables) if rebuild is not None else variables
        logits, updates = model.apply({**variables, "cache": state}, token_Bx1, decode=True, mutable=["cache"])
        return (logits[:, -1].astype(jnp.float32), *jax.tree.leaves(updates["cache"]))

    (batch,) = jax.export.symbolic_shape(loader.BATCH_SYMBOL)

    def spec(leaf):  # the batch axis of every cache array (keys, values, positions) is the symbol
        shape = (batch, *leaf.shape[1:]) if leaf.ndim else ()
        return jax.ShapeDtypeStruct(shape, leaf.dtype)

    params_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), variables)
    args = (params_spec, jax.ShapeDtypeStruct((batch, 1), jnp.int32), *(spec(leaf) for _, leaf in leaves))
    exported = jax.export.export(jax.jit(decode_step), platforms=tuple(platforms))(*args)
    path = os.path.join(version_dir, DECODER_FILE)
    with open(path, "wb") as f:
        f.write(bytes(exported.serialize()))
    signature["generation"] = {
        "file": DECODER_FILE,
        "tokenizer": tokenizer,
        "max_len": int(model.config.max_len),
        "vocab_size": int(model.config.vocab_size),
        "cache": [{"path": path_str(p), "dtype": str(np.dtype(leaf.dtype)),
                   "shape": [loader.BATCH_SYMBOL, *map(int, leaf.shape[1:])] if leaf.ndim else []}
                  for p, leaf in leaves],
    }
    with open(os.path.join(version_dir, loader.SIGNATURE_FILE), "w", encoding="utf-8") as f:
        json.dump(signature, f, indent=2)
    return path
