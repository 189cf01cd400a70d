"""``lepton-jax convert``: Hugging Face directories to lepton_jax checkpoints and back.

    lepton-jax convert --from-hf DIR --out CKPT_DIR [--dtype float32]
    lepton-jax convert --to-hf CKPT_DIR --out DIR [--dtype bfloat16] [--step N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import jax

DTYPES = ("float32", "bfloat16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lepton-jax convert",
                                     description="Hugging Face model directories in and out (GPT-2, Llama, BERT)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face model directory (config.json, safetensors)")
    source.add_argument("--to-hf", metavar="CKPT_DIR", help="a checkpoint written by --from-hf (or fine-tuned from one)")
    parser.add_argument("--out", required=True, help="the checkpoint directory (--from-hf) or model directory (--to-hf)")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="cast floating weights (default: keep)")
    parser.add_argument("--step", type=int, default=None, help="--to-hf: the checkpoint step (default: the latest)")
    return parser


def run_convert(argv: Sequence[str]) -> int:
    """Runs ``lepton-jax convert`` with ``argv``; returns the exit status."""
    from lepton_jax.convert import hf

    args = _parser().parse_args(argv)
    verb = "--from-hf" if args.from_hf else "--to-hf"
    try:
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise ValueError(f"--out {args.out} already exists and is not empty")
        if args.from_hf:
            model, variables, tokenizer = hf.from_hf(args.from_hf, dtype=args.dtype)
            out = hf.save_checkpoint(model, variables, args.out, tokenizer=tokenizer,
                                     base_config=hf.read_config(args.from_hf))
        else:
            if not os.path.isdir(args.to_hf):
                raise FileNotFoundError(f"{args.to_hf}: no such checkpoint directory")
            model, variables, tokenizer = hf.load(args.to_hf, step=args.step)
            out = hf.to_hf(model, variables, args.out, tokenizer=tokenizer, dtype=args.dtype,
                           base_config=hf.checkpoint_config(args.to_hf, args.step))
    except (FileNotFoundError, ValueError) as error:
        print(f"lepton-jax convert {verb}: {error}", file=sys.stderr)
        return 2
    arrays = jax.tree.leaves(variables)
    print(json.dumps({"out": out, "model": type(model).__name__, "arrays": len(arrays),
                      "parameters": sum(int(x.size) for x in arrays)}))
    return 0
