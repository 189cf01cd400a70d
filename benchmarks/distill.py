"""Distillation study on digits: does a CNN teacher make a small MLP better?

    python -m benchmarks.distill                         # 5 seeds, about 10 min on 2 CPU cores
    python -m benchmarks.distill --seeds 0 --epochs 100 --out /tmp/d.json   # a quick check

For each seed (its own train/val/test split) it trains, with ``recipes.digits``:

- the teacher: the default CNN with ``--label_smoothing=0`` (a label-smoothed
  teacher's soft targets carry less about how classes resemble each other);
- the student alone: an MLP with ``--hidden`` units, ``--epochs`` epochs;
- the student distilled on the batch images only (``--distill_mixup=0``);
- the student distilled on the batch images and blends of them
  (``--distill_mixup=1``), the recipe's default.

All students share the schedule, ``--distill_alpha=0.5`` and
``--distill_temperature=2``. Reports each run's test accuracy and the means;
JSON to ``benchmarks/results/distill_<date>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import statistics
import tempfile

import jax

from benchmarks import write_result
from recipes import digits

VARIANTS = {
    "alone": [],
    "distilled_plain": ["--teacher={teacher}", "--distill_mixup=0"],
    "distilled_blends": ["--teacher={teacher}", "--distill_mixup=1"],
}


def _quiet(argv: list[str]) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return digits.main(argv)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--hidden", default="16")
    parser.add_argument("--epochs", type=int, default=600)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    runs: dict[str, list[float]] = {"teacher": [], **{name: [] for name in VARIANTS}}
    with tempfile.TemporaryDirectory() as root:
        for seed in seeds:
            teacher = os.path.join(root, f"teacher{seed}")
            common = [f"--seed={seed}", "--progress=false"]
            runs["teacher"].append(_quiet(["--model=cnn", "--label_smoothing=0", f"--out={teacher}", *common])
                                   ["test_accuracy"])
            for name, flags in VARIANTS.items():
                argv = ["--model=mlp", f"--hidden={args.hidden}", f"--epochs={args.epochs}",
                        f"--out={os.path.join(root, f'{name}{seed}')}", *common,
                        *(f.format(teacher=teacher) for f in flags)]
                runs[name].append(_quiet(argv)["test_accuracy"])
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in runs.items()), flush=True)

    date = datetime.date.today().isoformat()
    result = {
        "bench": "distill",
        "date": date,
        "device": jax.devices()[0].device_kind,
        "platform": jax.devices()[0].platform,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "versions": {"jax": jax.__version__},
        "task": "digits (sklearn 8x8), 70/10/20 split per seed, test accuracy",
        "student": f"MLP hidden={args.hidden}, {args.epochs} epochs, AdamW cosine",
        "teacher": "CNN (recipe default), label_smoothing=0",
        "distillation": {"alpha": 0.5, "temperature": 2.0},
        "seeds": seeds,
        "test_accuracy": runs,
        "mean_test_accuracy": {k: statistics.mean(v) for k, v in runs.items()},
    }
    print(json.dumps(result["mean_test_accuracy"], indent=2))
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"distill_{date}.json")
    write_result(result, out)
    return result


if __name__ == "__main__":
    main()
