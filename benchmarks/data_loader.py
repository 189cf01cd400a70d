"""Data path throughput: packing, the Grain loader, and what training consumes.

    python -m benchmarks.data_loader                 # about 3 minutes on 2 CPU cores
    python -m benchmarks.data_loader --megabytes 4 --batches 20 --out /tmp/d.json   # a quick check

- Packing: ``data.pack_corpus`` over the standard library's ``.py`` files
  (``--megabytes`` of them) into rows of 1025 byte-level ids, with 1 and 2
  tokenizing processes: MB of text per second.
- Loading: ``data.GrainLoader`` over those shards, batches of B = 32 rows of
  T = 1024 positions through ``data.lm_example``, with 0, 1 and 2 worker
  processes: tokens per second (after the first batch).
- Consumption: tokens per second of a jitted train step of the GPT recipe's
  ``tiny`` (B = 32, T = 128) and ``gpt2-124m`` (B = 1, T = 1024) configs on
  this machine's CPU, the rate the loader has to keep up with.

JSON to ``benchmarks/results/data_loader_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sysconfig
import tempfile
import time

import jax
import numpy as np

from benchmarks import write_result
from lepton_jax import data, models, optim, train
from recipes.gpt import MODEL_CONFIGS


def _corpus(megabytes: float) -> list[str]:
    files, total = [], 0
    root = sysconfig.get_paths()["stdlib"]
    for path in sorted(data.corpus_files(os.path.join(root, "**", "*.py"))):
        files.append(path)
        total += os.path.getsize(path)
        if total >= megabytes * 1e6:
            break
    return files


def packing(files: list[str], out: str, workers: int) -> dict:
    started = time.perf_counter()
    meta = data.pack_corpus(files, "bytes", 1025, out, shards=8, val_fraction=0.01, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    return {"workers": workers, "seconds": round(seconds, 2), "text_mb": meta["text_bytes"] / 1e6,
            "mb_per_s": meta["text_bytes"] / 1e6 / seconds, "rows": meta["rows"]}


def loading(shards: str, workers: int, batches: int) -> dict:
    loader = data.GrainLoader(data.ArrayRecords(shards), batch_size=32, seed=0, worker_count=workers,
                              transforms=[data.lm_example])
    first = next(loader)
    tokens_per_batch = first["inputs"].size
    started = time.perf_counter()
    for _ in range(batches):
        next(loader)
    seconds = time.perf_counter() - started
    return {"workers": workers, "batches": batches, "tokens_per_s": batches * tokens_per_batch / seconds}


def consumption(name: str, batch: int, seq: int, steps: int) -> dict:
    config = MODEL_CONFIGS[name]
    model = models.GPT(config.__class__(**{**config.__dict__, "max_len": max(config.max_len, seq)}))
    tx = optim.adamw(1e-4)
    state = train.create_train_state(model, tx, np.zeros((1, seq), np.int32))
    step = train.make_train_step(model, tx, models.lm_loss, input_key="inputs")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)).astype(np.int32)
    example = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    state, _ = step(state, example)
    jax.block_until_ready(state.params)
    started = time.perf_counter()
    for _ in range(steps):
        state, _ = step(state, example)
    jax.block_until_ready(state.params)
    seconds = (time.perf_counter() - started) / steps
    return {"config": name, "batch": batch, "seq": seq, "step_seconds": seconds, "tokens_per_s": batch * seq / seconds}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=16.0)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    files = _corpus(args.megabytes)
    result = {"date": datetime.date.today().isoformat(), "platform": platform.platform(), "cpus": os.cpu_count(),
              "jax": jax.__version__, "files": len(files)}
    with tempfile.TemporaryDirectory() as root:
        result["packing"] = [packing(files, os.path.join(root, f"pack{w}"), w) for w in (1, 2)]
        for row in result["packing"]:
            print(f"pack with {row['workers']} process(es): {row['text_mb']:.1f} MB in {row['seconds']:.1f} s, "
                  f"{row['mb_per_s']:.2f} MB/s")
        shards = os.path.join(root, "pack2", "train")
        result["loading"] = [loading(shards, w, args.batches) for w in (0, 1, 2)]
        for row in result["loading"]:
            print(f"GrainLoader, {row['workers']} workers: {row['tokens_per_s'] / 1e6:.2f} M tokens/s (B=32, T=1024)")
    result["consumption"] = [consumption("tiny", 32, 128, 10), consumption("gpt2-124m", 1, 1024, 2)]
    for row in result["consumption"]:
        print(f"train step {row['config']} (B={row['batch']}, T={row['seq']}) on CPU: "
              f"{row['tokens_per_s'] / 1e3:.1f} k tokens/s")
    best = max(r["tokens_per_s"] for r in result["loading"])
    result["loader_over_fastest_consumer"] = best / max(r["tokens_per_s"] for r in result["consumption"])
    result["loader_over_h100_gpt2_flax_baseline"] = best / 463e3
    print(f"loader / fastest CPU consumer: {result['loader_over_fastest_consumer']:.1f}x; "
          f"loader / 463k tokens/s (GPT-2 124M, Flax, H100): {result['loader_over_h100_gpt2_flax_baseline']:.1f}x")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"data_loader_{result['date']}.json")
    write_result(result, out)
    return result


if __name__ == "__main__":
    main()
