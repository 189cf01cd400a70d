"""Sentence embeddings from an encoder: texts in, mean-pooled vectors out.

``embed_texts`` tokenizes in batches (``HFTokenizer.encode_batch``: the
tokenizer's special tokens and padding), runs the encoder and averages its
last hidden states over the real tokens, the pooling sentence-transformers
models use.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as linen
import jax
import numpy as np

from lepton_jax.models.bert import mean_pool

# Sequence lengths are padded up to a power of two from this, so a corpus
# of varied lengths compiles a handful of programs, not one per length.
MIN_BUCKET = 8


@functools.partial(jax.jit, static_argnums=0)
def _pooled_batch(model: linen.Module, variables: Any, ids_BxT: jax.Array, mask_BxT: jax.Array,
                  types_BxT: jax.Array) -> jax.Array:
    hidden_BxTxD = model.apply(variables, ids_BxT, attention_mask=mask_BxT, token_type_ids=types_BxT)
    return mean_pool(hidden_BxTxD, mask_BxT)


def _bucket(length: int, limit: int) -> int:
    """The padded sequence length for a batch whose longest row has ``length`` tokens."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return max(min(bucket, limit), length)


def _pad(array_NxT: np.ndarray, rows: int, length: int) -> np.ndarray:
    return np.pad(array_NxT, ((0, rows - array_NxT.shape[0]), (0, length - array_NxT.shape[1])))


def embed_texts(model: linen.Module, variables: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 32,
                max_length: int | None = None, normalize: bool = False) -> np.ndarray:
    """Mean-pooled embeddings of ``texts``: float32 ``[len(texts), D]``.

    Args:
      model, variables: an encoder (``BertEncoder``) taking ``input_ids``,
        ``attention_mask`` and ``token_type_ids`` ``[B, T]`` and returning
        hidden states ``[B, T, D]``.
      tokenizer: an ``HFTokenizer`` (``encode_batch``).
      batch_size: rows per forward pass; the last batch is padded with empty
        rows, so every batch of a length bucket reuses one compilation.
      max_length: tokens kept per text, special tokens included (default and
        upper bound: the model's ``max_len``).
      normalize: scale each embedding to unit L2 norm.

    Nothing is differentiated: the outputs are numpy arrays.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"embed_texts: batch_size must be a positive int, got {batch_size!r}")
    limit = getattr(getattr(model, "config", None), "max_len", None)
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(f"embed_texts: max_length {max_length} exceeds the model's max_len {limit}")
    max_length = max_length or limit
    texts = list(texts)
    chunks = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer.encode_batch(texts[start:start + batch_size], max_length=max_length)
        length = _bucket(batch["input_ids"].shape[1], max_length or batch["input_ids"].shape[1])
        ids, mask, types = (_pad(batch[k], batch_size, length) for k in ("input_ids", "attention_mask",
                                                                          "token_type_ids"))
        pooled_BxD = np.asarray(_pooled_batch(model, variables, ids, mask, types), np.float32)
        chunks.append(pooled_BxD[:len(batch["input_ids"])])
    if not chunks:
        width = getattr(getattr(model, "config", None), "d_model", 0)
        return np.zeros((0, width), np.float32)
    embeddings_NxD = np.concatenate(chunks)
    if normalize:
        norms_Nx1 = np.linalg.norm(embeddings_NxD, axis=1, keepdims=True)
        embeddings_NxD = embeddings_NxD / np.maximum(norms_Nx1, 1e-12)
    return embeddings_NxD.astype(np.float32)
