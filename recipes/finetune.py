"""Fine-tune a pretrained causal LM (a Hugging Face directory or a converted
checkpoint) on text, with LoRA adapters or every weight.

    python -m recipes.finetune --base hf/llama --lora-rank 8             # stdlib text, adapters only
    python -m recipes.finetune --base hf/llama --full                    # every weight, for comparison
    python -m recipes.finetune --base ckpt/llama --data packed --steps 500 --base-dtype int8

Data: the Python standard library's sources (default) or the files in
``--data`` tokenized with the base's tokenizer (bytes when it has none), or
a packed corpus (``lepton-jax data pack``). Reported: trainable
parameters, the compiled step's peak memory, step time and validation
bits per byte. Outputs in ``--out``: the adapters (``adapters/``, small, the
base is not copied) or the full checkpoint (``checkpoint/``), a merged
Hugging Face directory with ``--export-hf``, and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import config as config_lib, convert, data, lora, models, optim, parallel, registry, train

DEFAULT_TARGETS = r"attention/(query|key|value|out)$|mlp/w_(in|gate|out)$"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    base: str = ""
    data: str = ""
    max_bytes: int = 1 << 20
    full: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = DEFAULT_TARGETS
    base_dtype: str = "float32"  # the frozen base in LoRA runs: float32, bfloat16 or int8
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 128
    learning_rate: float = 0.0  # 0: 1e-3 for LoRA, 1e-4 for full
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_windows: int = 32
    out: str = "runs/finetune"
    export_hf: str = ""
    seed: int = 0
    progress: bool = True


def _check(run: RunConfig) -> None:
    if not run.base:
        raise ValueError("finetune: --base is required (a Hugging Face directory or a converted checkpoint)")
    if not os.path.isdir(run.base):
        raise FileNotFoundError(f"finetune: --base {run.base}: no such directory")
    if run.base_dtype not in lora.BASE_DTYPES:
        raise ValueError(f"finetune: --base_dtype must be one of {lora.BASE_DTYPES}, got {run.base_dtype!r}")
    for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows"):
        if getattr(run, name) < 1:
            raise ValueError(f"finetune: --{name} must be >= 1, got {getattr(run, name)}")


def text_data(run: RunConfig, tokenizer: Any, vocab_size: int) -> tuple[Any, dict[str, np.ndarray], float, str]:
    """``(train batches, validation windows, tokens per byte, description)``."""
    if data.is_pack(run.data):
        pack = data.read_pack(run.data)
        if pack["vocab_size"] > vocab_size:
            raise ValueError(f"finetune: the pack in {run.data} has {pack['vocab_size']} ids but the base model's "
                             f"vocabulary is {vocab_size}")
        if pack["seq_len"] - 1 != run.seq_len:
            raise ValueError(f"finetune: --seq_len {run.seq_len} does not match the pack's rows of {pack['seq_len']}")
        batches = data.GrainLoader(data.ArrayRecords(os.path.join(run.data, "train")), batch_size=run.batch_size,
                                   seed=run.seed, transforms=[data.lm_example])
        rows = data.ArrayRecords(os.path.join(run.data, "val"))
        examples = [data.lm_example(rows[i]) for i in range(min(len(rows), run.eval_windows))]
        val = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        return batches, val, pack["tokens"] / max(1, pack["text_bytes"]), f"pack {run.data}"
    raw = data.load_bytes(run.data.split(",") if run.data else None, max_bytes=run.max_bytes)
    if tokenizer is None:
        if vocab_size < 256:
            raise ValueError(f"finetune: the base has no tokenizer and a vocabulary of {vocab_size} < 256 (bytes)")
        tokens = raw.astype(np.int32)
    else:
        tokens = tokenizer.encode(raw.tobytes().decode("utf-8", errors="replace"))
        if tokens.max() >= vocab_size:
            raise ValueError(f"finetune: the tokenizer gives id {tokens.max()} >= the vocabulary {vocab_size}")
    train_tokens, val_tokens = data.split_tokens(tokens, 0.05)
    batches = data.TokenWindows(train_tokens, run.batch_size, run.seq_len, seed=run.seed)
    val = data.eval_windows(val_tokens, run.seq_len, run.eval_windows)
    return batches, val, len(tokens) / len(raw), f"{len(raw) / 1e6:.2f} MB of text, {len(tokens):,} tokens"


def peak_memory(compiled: Any) -> int | None:
    """A compiled step's peak bytes (arguments + outputs - aliased + temporaries)."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None
    return int(memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
               + memory.temp_size_in_bytes)


def train_run(run: RunConfig, extra_hooks: Sequence[train.Hook] = ()) -> dict[str, Any]:
    """Fine-tunes (``extra_hooks`` join the recipe's) and returns the summary."""
    _check(run)
    model, variables, tokenizer = convert.load(run.base, dtype=jnp.float32)
    if not isinstance(model, models.GPT):
        raise ValueError(f"finetune: {run.base} holds a {type(model).__name__}; fine-tuning needs a causal LM")
    model = model.clone(config=dataclasses.replace(model.config, max_len=max(model.config.max_len, run.seq_len)))
    batches, val, tokens_per_byte, corpus = text_data(run, tokenizer, model.config.vocab_size)
    lr = run.learning_rate or (1e-4 if run.full else 1e-3)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=lr, weight_decay=run.weight_decay,
                                                    clip_norm=1.0))
    if run.full:
        trained_model = model
        state = train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                 opt_state=tx.init(variables["params"]), model_state={},
                                 rng=jax.random.PRNGKey(run.seed))
        trainable = train.count_params(variables["params"])
    else:
        adapters = lora.LoRAConfig(pattern=run.lora_targets, rank=run.lora_rank, alpha=run.lora_alpha,
                                   dropout=run.lora_dropout)
        trained_model = lora.LoRA(model, adapters)
        axes = parallel.param_logical_axes(model, np.zeros((1, 1), np.int32))
        state = lora.create_train_state(trained_model, variables["params"], tx, seed=run.seed, logical_axes=axes,
                                        base_dtype=run.base_dtype)
        trainable = train.count_params(state.params)
    model_inputs = ("segment_ids",) if "segment_ids" in val else ()
    # Donated: a LoRA step hands the frozen base back (its own collection), which must not be copied.
    step = train.make_train_step(trained_model, tx, models.lm_loss, input_key="inputs", model_inputs=model_inputs,
                                 donate=True)
    eval_step = train.make_eval_step(trained_model, models.lm_loss, input_key="inputs", model_inputs=model_inputs)
    example = {k: jax.ShapeDtypeStruct((run.batch_size, *v.shape[1:]), v.dtype) for k, v in val.items()}
    step = step.lower(state, example).compile()  # compiled once: measured, then trained with
    memory = peak_memory(step)
    total = train.count_params(variables["params"])
    print(f"finetune {'full' if run.full else f'LoRA rank {run.lora_rank}'}: {trainable:,} trainable of "
          f"{total:,} parameters | {corpus} | compiled step peak "
          + (f"{memory / 2**20:.1f} MiB" if memory is not None else "unknown"))
    eval_batch = min(run.batch_size, len(val["inputs"]))
    to_bits = lambda m: {"bits_per_byte": m["loss"] / math.log(2) * tokens_per_byte}  # noqa: E731
    hooks = [*([train.ProgressBar()] if run.progress else []), train.TrainMetrics(every=max(1, run.eval_every // 2)),
             train.Evaluate(eval_step, val, every=run.eval_every, batch_size=eval_batch,
                            transform=to_bits),
             train.MetricFiles(run.out), *extra_hooks]
    before = to_bits(train.evaluate(state, eval_step, data.iterate_once(val, eval_batch)))["bits_per_byte"]
    step_seconds: list[float] = []

    def timed_step(state, batch):  # the steps' own time, evaluation left out
        started = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        step_seconds.append(time.perf_counter() - started)
        return state, metrics

    result = train.fit(state, timed_step, batches, num_steps=run.steps, hooks=hooks)
    os.makedirs(run.out, exist_ok=True)
    if run.full:
        saved = convert.save_checkpoint(model, {"params": result.state.params}, os.path.join(run.out, "checkpoint"),
                                        tokenizer=tokenizer)
        merged = result.state.params
    else:
        saved = os.path.join(run.out, "adapters")
        lora.save_adapters(saved, result.state.params, adapters, metadata={"base": os.path.abspath(run.base)})
        # Into the base as it was trained against (dequantized when stored in int8).
        merged = lora.merge(result.state.model_state[lora.BASE_COLLECTION], result.state.params, adapters)
    if run.export_hf:
        convert.to_hf(model, {"params": merged}, run.export_hf, tokenizer=tokenizer)
    summary = {"mode": "full" if run.full else "lora", "base": run.base, "steps": int(result.state.step),
               "trainable_params": trainable, "total_params": total, "compiled_peak_bytes": memory,
               "seconds_per_step": float(np.median(step_seconds)), "val_bits_per_byte_before": float(before),
               "val_bits_per_byte": float(result.eval_metrics["bits_per_byte"]), "saved": saved,
               "num_params": trainable,
               "val_metrics": {k: float(v) for k, v in result.eval_metrics.items() if np.ndim(v) == 0},
               "config": config_lib.to_dict(run)}
    with open(os.path.join(run.out, "results.json"), "w", encoding="utf-8") as file:
        json.dump(summary, file, indent=2)
    print(f"validation {summary['val_bits_per_byte_before']:.3f} -> {summary['val_bits_per_byte']:.3f} bits/byte "
          f"after {summary['steps']} steps ({summary['seconds_per_step'] * 1e3:.0f} ms/step) | saved {saved}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if config_lib.print_help(argv, __doc__, RunConfig()):
        return 0
    try:
        train_run(config_lib.override(RunConfig(), argv))
    except (FileNotFoundError, ValueError, KeyError, TypeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"finetune: {message}" if not str(message).startswith("finetune") else message, file=sys.stderr)
        return 2
    return 0


RECIPE = registry.Recipe(name="finetune", main=main, config=RunConfig(), run=train_run,
                         description="fine-tune a converted causal LM with LoRA adapters (or every weight)")

if __name__ == "__main__":
    sys.exit(main())
