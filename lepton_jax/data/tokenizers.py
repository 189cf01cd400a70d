"""Tokenizers: byte-level, or Hugging Face ``tokenizers`` (BPE trained on your
corpus, or any local ``tokenizer.json``). Nothing is downloaded.

Every tokenizer has ``encode(text) -> int32 ids``, ``decode(ids) -> str``,
``vocab_size``, an end-of-document id ``eod_id`` (what packing puts between
documents; ``None`` for an encoder's tokenizer that has none, e.g. BERT's)
and a ``name`` a pack's metadata records. ``HFTokenizer.encode_batch`` gives
an encoder's padded inputs, with the tokenizer's own special tokens.
"""

from __future__ import annotations

import glob as glob_lib
import json
import os
from typing import Sequence

import numpy as np

EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>")
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|padding|>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, and 256 for the end of a document (vocabulary 257)."""

    name = "bytes"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(raw, np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids)
        return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (loaded from disk)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer: {self.path!r} does not exist (give 'bytes' or a tokenizer.json)")
        try:
            self._tokenizer = Tokenizer.from_file(self.path)
        except Exception as error:  # noqa: BLE001 (the library raises its own Exception types)
            raise ValueError(f"tokenizer: {self.path!r} is not a Hugging Face tokenizer.json: {error}") from None
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        found = [t for t in EOD_TOKENS if self._tokenizer.token_to_id(t) is not None]
        # An encoder's tokenizer (BERT's [CLS] ... [SEP]) has none; packing needs one (``require_eod``).
        self.eod_id = int(self._tokenizer.token_to_id(found[0])) if found else None
        self.name = os.path.basename(self.path)
        self._batch_tokenizer = None

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids)])

    def encode_batch(self, texts: Sequence[str], *, max_length: int | None = None) -> dict[str, np.ndarray]:
        """``texts`` as an encoder's inputs, as ``transformers`` gives them:
        the tokenizer's special tokens added (its post-processor, e.g.
        ``[CLS] ... [SEP]``), cut to ``max_length`` tokens (specials
        included), padded on the right with its pad token to the longest.

        Returns int32 ``input_ids``, ``attention_mask`` (1 real, 0 padding)
        and ``token_type_ids``, each ``[len(texts), T]``.
        """
        if isinstance(texts, (str, bytes)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"encode_batch: texts must be a sequence of str, got {type(texts).__name__}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 1):
            raise ValueError(f"encode_batch: max_length must be a positive int or None, got {max_length!r}")
        tokenizer = self._padding_tokenizer()
        if max_length is None:
            tokenizer.no_truncation()
        else:
            tokenizer.enable_truncation(max_length)
        encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
        if not encodings:
            empty = np.zeros((0, 0), np.int32)
            return {"input_ids": empty, "attention_mask": empty.copy(), "token_type_ids": empty.copy()}
        return {"input_ids": np.asarray([e.ids for e in encodings], np.int32),
                "attention_mask": np.asarray([e.attention_mask for e in encodings], np.int32),
                "token_type_ids": np.asarray([e.type_ids for e in encodings], np.int32)}

    def _padding_tokenizer(self):
        """A copy of the tokenizer that pads batches to their longest row (so
        ``encode`` keeps the file's own padding and truncation settings)."""
        if self._batch_tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_str(self._tokenizer.to_str())
            stored = tokenizer.padding or {}
            pad_token = stored.get("pad_token") or self._pad_token()
            tokenizer.enable_padding(direction=stored.get("direction", "right"),
                                     pad_id=int(tokenizer.token_to_id(pad_token)), pad_token=pad_token,
                                     pad_type_id=int(stored.get("pad_type_id", 0)))
            self._batch_tokenizer = tokenizer
        return self._batch_tokenizer

    def _pad_token(self) -> str:
        """The pad token: ``tokenizer_config.json``'s beside the file, else the first of ``PAD_TOKENS``."""
        config_path = os.path.join(os.path.dirname(self.path), "tokenizer_config.json")
        if os.path.isfile(config_path):
            with open(config_path) as file:
                pad = json.load(file).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str) and self._tokenizer.token_to_id(pad) is not None:
                return pad
        for token in PAD_TOKENS:
            if self._tokenizer.token_to_id(token) is not None:
                return token
        raise ValueError(f"encode_batch: {self.path!r} has no padding token; expected one of {PAD_TOKENS} "
                         "(or a pad_token in tokenizer_config.json)")


Tokenizer = ByteTokenizer | HFTokenizer


def require_eod(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer``, or an error when it has no end-of-document token (packing needs one)."""
    if tokenizer.eod_id is None:
        raise ValueError(f"tokenizer: {getattr(tokenizer, 'path', tokenizer.name)!r} has no end-of-document token, "
                         f"which packing puts between documents; expected one of {EOD_TOKENS}")
    return tokenizer


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """``"bytes"`` or the path of a ``tokenizer.json``, for packing a corpus:
    it must have an end-of-document token."""
    return ByteTokenizer() if os.fspath(spec) == "bytes" else require_eod(HFTokenizer(spec))


def corpus_files(pattern: str | Sequence[str]) -> list[str]:
    """The files a glob (or several) matches, sorted; an error if none."""
    patterns = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    files = sorted({f for p in patterns for f in glob_lib.glob(os.fspath(p), recursive=True) if os.path.isfile(f)})
    if not files:
        raise FileNotFoundError(f"corpus: {', '.join(map(str, patterns))} matches no file")
    return files


def train_bpe(files: Sequence[str], vocab_size: int, out: str | os.PathLike) -> HFTokenizer:
    """A byte-level BPE tokenizer of ``vocab_size`` ids (``<|endoftext|>`` included)
    trained on ``files`` with Hugging Face ``tokenizers``, saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= len(alphabet):
        raise ValueError(f"tokenizer: --vocab-size must be an int above the {len(alphabet)} byte symbols, "
                         f"got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train(list(files), trainer)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tokenizer.save(os.fspath(out))
    return HFTokenizer(out)


__all__ = ["ByteTokenizer", "EOD_TOKENS", "HFTokenizer", "PAD_TOKENS", "Tokenizer", "corpus_files", "load_tokenizer",
           "require_eod", "train_bpe"]
