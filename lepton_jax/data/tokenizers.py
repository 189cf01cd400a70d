"""Tokenizers: byte-level, or Hugging Face ``tokenizers`` (BPE trained on your
corpus, or any local ``tokenizer.json``). Nothing is downloaded.

Every tokenizer has ``encode(text) -> int32 ids``, ``decode(ids) -> str``,
``vocab_size``, an end-of-document id ``eod_id`` (what packing puts between
documents) and a ``name`` a pack's metadata records.
"""

from __future__ import annotations

import glob as glob_lib
import os
from typing import Sequence

import numpy as np

EOD_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>")


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
        if not found:
            raise ValueError(f"tokenizer: {self.path!r} has no end-of-document token; expected one of {EOD_TOKENS}")
        self.eod_id = int(self._tokenizer.token_to_id(found[0]))
        self.name = os.path.basename(self.path)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in np.asarray(ids)])


Tokenizer = ByteTokenizer | HFTokenizer


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """``"bytes"`` or the path of a ``tokenizer.json``."""
    return ByteTokenizer() if os.fspath(spec) == "bytes" else HFTokenizer(spec)


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


__all__ = ["ByteTokenizer", "EOD_TOKENS", "HFTokenizer", "Tokenizer", "corpus_files", "load_tokenizer", "train_bpe"]
