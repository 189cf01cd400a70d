"""``lepton-jax data``: train a tokenizer, pack a corpus into ArrayRecord shards.

    lepton-jax data tokenizer --corpus "texts/**/*.txt" --vocab-size 8192 --out tokenizer.json
    lepton-jax data pack --corpus "texts/**/*.txt" --tokenizer tokenizer.json --seq-len 1024 --out packed \\
        --shards 16 --val-fraction 0.01 --workers 2
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-jax data", description=__doc__.split("\n\n")[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    tok = verbs.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a corpus (Hugging Face tokenizers)")
    tok.add_argument("--corpus", required=True, action="append", help="a glob of text files (repeatable)")
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--out", required=True, help="the tokenizer.json to write")
    pack = verbs.add_parser("pack", help="tokenize and pack a corpus into fixed-length rows (ArrayRecord shards)")
    pack.add_argument("--corpus", required=True, action="append", help="a glob of text files, one document each")
    pack.add_argument("--tokenizer", default="bytes", help="'bytes' or a tokenizer.json")
    pack.add_argument("--seq-len", type=int, required=True)
    pack.add_argument("--out", required=True)
    pack.add_argument("--shards", type=int, default=1)
    pack.add_argument("--val-fraction", type=float, default=0.01)
    pack.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    pack.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    return parser


def run_data(argv: Sequence[str]) -> int:
    """Runs ``lepton-jax data`` with ``argv``; returns the exit status."""
    from lepton_jax.data.pack import pack_corpus
    from lepton_jax.data.tokenizers import corpus_files, train_bpe

    args = _parser().parse_args(argv)
    try:
        files = corpus_files(args.corpus)
        if args.verb == "tokenizer":
            tokenizer = train_bpe(files, args.vocab_size, args.out)
            print(f"trained on {len(files)} files: {tokenizer.vocab_size} ids, end of document "
                  f"{tokenizer.eod_id}; wrote {args.out}")
            return 0
        metadata = pack_corpus(files, args.tokenizer, args.seq_len, args.out, shards=args.shards,
                               val_fraction=args.val_fraction, workers=args.workers, progress=args.progress)
    except (FileNotFoundError, ValueError) as error:
        print(f"lepton-jax data {args.verb}: {error}", file=sys.stderr)
        return 2
    summary = {k: metadata[k] for k in ("documents", "tokens", "rows", "padding_fraction", "shards")}
    print(json.dumps({**summary, "skipped": {k: v["count"] for k, v in metadata["skipped"].items()},
                      "splits": metadata["splits"]}))
    return 0
