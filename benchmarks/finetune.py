"""LoRA against full fine-tuning of a converted small decoder, same steps.

    python -m benchmarks.finetune                       # about 5 minutes on 2 CPU cores
    python -m benchmarks.finetune --pretrain-steps 50 --steps 20 --out /tmp/f.json   # a quick check

No pretrained weights can be downloaded here, so the base is made the way a
user's would be: a small Llama-family decoder (RMSNorm, SwiGLU, rotary,
grouped-query attention, untied head, byte vocabulary) is trained on one
part of the Python standard library's sources, written as a Hugging Face
directory with ``convert.to_hf`` (and read back by ``from_hf`` in the
fine-tuning recipe), then fine-tuned on another part (``unittest`` and
``xml``, files the pretraining never saw) twice, through
``recipes.finetune``: LoRA (rank 8 on the attention and MLP projections)
and every weight. Reported per mode: trainable parameters, the compiled
step's peak memory (``memory_analysis``), step time and validation bits per
byte before and after. JSON to ``benchmarks/results/finetune_<date>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import sysconfig
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import write_result
from lepton_jax import convert, data, models, optim, train
from recipes import finetune

BASE = models.GPTConfig(vocab_size=256, max_len=256, num_layers=4, num_heads=8, num_kv_heads=4, d_model=256,
                        d_ff=704, positions="rotary", mlp="swiglu", norm="rms", tie_embeddings=False)


def pretrain(steps: int, out_dir: str, seed: int = 0) -> tuple[str, float]:
    """Trains the base on the first 2 MB of the stdlib and writes it as a Hugging Face directory."""
    tokens = data.load_bytes(None, max_bytes=2 << 20).astype(np.int32)
    model = models.GPT(BASE)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=3e-3, weight_decay=0.0,
                                                    clip_norm=1.0))
    state = train.create_train_state(model, tx, np.zeros((1, 128), np.int32), seed=seed)
    step = train.make_train_step(model, tx, models.lm_loss, input_key="inputs", donate=True)
    started = time.perf_counter()
    for batch, _ in zip(data.TokenWindows(tokens, 16, 128, seed=seed), range(steps)):
        state, metrics = step(state, batch)
    jax.block_until_ready(state)
    convert.to_hf(model, {"params": state.params}, out_dir)
    return out_dir, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default=f"benchmarks/results/finetune_{datetime.date.today()}.json")
    args = parser.parse_args()
    stdlib = sysconfig.get_paths()["stdlib"]
    finetune_data = ",".join(os.path.join(stdlib, d) for d in ("unittest", "xml"))
    with tempfile.TemporaryDirectory() as tmp:
        base, pretrain_seconds = pretrain(args.pretrain_steps, os.path.join(tmp, "base"))
        print(f"pretrained the base for {args.pretrain_steps} steps in {pretrain_seconds:.0f}s")
        runs = {}
        for mode in ("lora", "full"):
            run = finetune.RunConfig(base=base, data=finetune_data, full=mode == "full", steps=args.steps,
                                     batch_size=8, seq_len=128, eval_every=args.steps, eval_windows=64,
                                     out=os.path.join(tmp, mode), progress=False)
            summary = finetune.train_run(run)
            runs[mode] = {k: summary[k] for k in ("trainable_params", "total_params", "compiled_peak_bytes",
                                                  "seconds_per_step", "val_bits_per_byte_before",
                                                  "val_bits_per_byte")}
            runs[mode]["learning_rate"] = 1e-4 if mode == "full" else 1e-3
        adapters_bytes = sum(os.path.getsize(os.path.join(tmp, "lora", "adapters", f))
                             for f in os.listdir(os.path.join(tmp, "lora", "adapters")))
    lora_run, full = runs["lora"], runs["full"]
    result = {
        "benchmark": "LoRA vs full fine-tuning of a converted Llama-family decoder on stdlib text",
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "python": platform.python_version(),
        "base": {**dataclasses.asdict(BASE), "dtype": str(jnp.dtype(BASE.dtype)), "pretrain_steps": args.pretrain_steps,
                 "pretrain_seconds": pretrain_seconds},
        "finetune": {"steps": args.steps, "batch_size": 8, "seq_len": 128, "data": "stdlib unittest/ + xml/"},
        "runs": runs, "adapter_files_bytes": adapters_bytes,
        "ratios_lora_over_full": {
            "trainable_params": lora_run["trainable_params"] / full["trainable_params"],
            "compiled_peak_bytes": lora_run["compiled_peak_bytes"] / full["compiled_peak_bytes"],
            "seconds_per_step": lora_run["seconds_per_step"] / full["seconds_per_step"]},
    }
    print({k: v for k, v in result.items() if k in ("runs", "ratios_lora_over_full")})
    write_result(result, args.out)


if __name__ == "__main__":
    main()
