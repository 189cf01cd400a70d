"""Embed a file of texts with a pretrained encoder (BERT), one vector per line.

    python -m recipes.embed --base DIR --texts texts.txt --out embeddings.npy [--normalize]
        [--batch-size 32] [--max-length 128]

``--base``: a Hugging Face model directory (``config.json``,
``model.safetensors``, ``tokenizer.json``) or a checkpoint ``lepton-jax
convert --from-hf`` wrote. ``--texts``: UTF-8, one text per line (a final
newline ends the last text; it does not start an empty one). ``--out``: an
``(N, D)`` float32 ``.npy`` of the encoder's last hidden states averaged
over each text's tokens (``--normalize``: unit L2 norms).

A sentence-transformers directory (``modules.json``) is read as its library
reads it: its pooling must be the mean (another is refused), and a
``Normalize`` module normalizes without the flag.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

PROG = "python -m recipes.embed"


class UsageError(Exception):
    """A bad command line or input, printed as one line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage and exits; we want one line
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="a Hugging Face model directory or a converted checkpoint")
    parser.add_argument("--texts", required=True, help="a UTF-8 file, one text per line")
    parser.add_argument("--out", required=True, help="the .npy to write, (N, D) float32")
    parser.add_argument("--normalize", action="store_true", help="unit L2 norm per embedding")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=None, help="tokens per text (default: the model's max_len)")
    return parser


def read_texts(path: str) -> list[str]:
    """The lines of ``path`` without their newlines (no empty text after a final newline)."""
    if not os.path.isfile(path):
        raise UsageError(f"--texts: {path!r} is not a file")
    try:
        with open(path, encoding="utf-8") as file:  # universal newlines: \r\n reads as \n
            lines = file.read().split("\n")  # not splitlines(): a text may hold \x0c or \u2028
    except UnicodeDecodeError as error:
        raise UsageError(f"--texts: {path!r} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    return lines[:-1] if lines[-1] == "" else lines


def sentence_transformers_modules(base: str) -> bool:
    """Whether the sentence-transformers modules of ``base`` (if any) normalize;
    an error when they pool other than by the mean."""
    path = os.path.join(base, "modules.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as file:
        modules = json.load(file)
    normalize = False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith(".Pooling"):
            with open(os.path.join(base, module.get("path", ""), "config.json"), encoding="utf-8") as file:
                pooling = json.load(file)
            # sentence-transformers 6 writes "pooling_mode": "mean"; earlier
            # releases one flag per mode ("pooling_mode_mean_tokens": true).
            modes = pooling.get("pooling_mode") or sorted(
                k.removeprefix("pooling_mode_").removesuffix("_tokens") for k, v in pooling.items()
                if k.startswith("pooling_mode_") and v is True)
            if modes not in ("mean", ["mean"]):
                raise UsageError(f"--base: {base!r} pools by {modes} in sentence-transformers; this recipe mean-pools")
        elif kind.endswith(".Normalize"):
            normalize = True
        elif not kind.endswith(".Transformer"):
            raise UsageError(f"--base: {base!r} has the sentence-transformers module {kind!r}, which this recipe "
                             "does not run")
    return normalize


def embed_file(base: str, texts_path: str, out: str, *, normalize: bool = False, batch_size: int = 32,
               max_length: int | None = None) -> np.ndarray:
    """Embeds every line of ``texts_path`` with the encoder at ``base``; writes and returns ``(N, D)`` float32."""
    from lepton_jax.convert import is_hf_dir, load
    from lepton_jax.models import BertEncoder
    from lepton_jax.models.embedding import embed_texts

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise UsageError(f"--max-length must be >= 2 (room for the special tokens), got {max_length}")
    if not os.path.isdir(base):
        raise UsageError(f"--base: {base!r} is not a directory")
    texts = read_texts(texts_path)
    normalize = sentence_transformers_modules(base) or normalize
    try:
        model, variables, tokenizer = load(base)
    except (FileNotFoundError, ValueError) as error:
        kind = "Hugging Face model directory" if is_hf_dir(base) else "converted checkpoint (and has no config.json)"
        raise UsageError(f"--base: {base!r} is not a readable {kind}: {error}") from None
    if tokenizer is None:
        raise UsageError(f"--base: {base!r} has no tokenizer.json")
    if not isinstance(model, BertEncoder):
        raise UsageError(f"--base: {base!r} holds a {type(model).__name__}, not an encoder (BERT)")
    embeddings = embed_texts(model, variables, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                             normalize=normalize)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, embeddings)
    return embeddings


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the recipe with ``argv``; returns the exit status (2: a usage error, printed as one line)."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        embeddings = embed_file(args.base, args.texts, args.out, normalize=args.normalize,
                                batch_size=args.batch_size, max_length=args.max_length)
    except (UsageError, FileNotFoundError, ValueError) as error:
        print(f"{PROG}: {error}".replace("\n", " "), file=sys.stderr)
        return 2
    print(f"embedded {embeddings.shape[0]} texts as {embeddings.shape[1]}-d vectors; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
