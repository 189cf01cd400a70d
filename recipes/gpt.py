"""Train a byte-level GPT on real text; the same script from one CPU to a pod.

    python -m recipes.gpt --config tiny                       # CPU: stdlib sources, a few minutes
    python -m recipes.gpt --config gpt2-124m --dtype bfloat16 --mesh data=-1,fsdp=8 --rules fsdp
    python -m recipes.gpt --config tiny --generate "def main(" # sample from the latest checkpoint
    python -m recipes.gpt --config tiny --mesh stage=2,data=2,fsdp=2 --microbatches 4   # pipeline
    python -m recipes.gpt --config tiny --mesh seq=4,data=2                             # context parallel

Data: bytes of the files in ``--data`` (comma-separated files/directories) or,
by default, the Python standard library's sources; the last 5% is held out
and validation loss is reported in bits per byte. The mesh and rules are
printed at start; checkpoints, ``metrics.jsonl``, TensorBoard events and a
plot go to ``--out``; ``--resume`` continues exactly.

A ``stage`` mesh axis runs the blocks as a pipeline of that many stages
(``--microbatches M``, ``--repeats R`` for the circular schedule, ``--remat``
per stage); the analytic bubble is printed and saved. A ``seq`` axis splits
the sequence (ring attention). Both need no other flag: every rules preset
maps the sequence and the stacked layers to those axes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import checkpoint, config as config_lib, data, models, optim, parallel, registry, train

_TINY = models.GPTConfig(vocab_size=256, max_len=128, num_layers=4, num_heads=4, d_model=128, d_ff=512,
                         positions="rotary")
MODEL_CONFIGS = {
    # A smoke-test size (CI, a first try of a layout): tiny with two blocks, half its compile time.
    "nano": dataclasses.replace(_TINY, num_layers=2),
    "tiny": _TINY,
    "gpt2-124m": models.GPTConfig(vocab_size=256, max_len=1024, num_layers=12, num_heads=12, d_model=768,
                                  d_ff=3072),
    "gpt2-350m": models.GPTConfig(vocab_size=256, max_len=1024, num_layers=24, num_heads=16, d_model=1024,
                                  d_ff=4096),
    "1b": models.GPTConfig(vocab_size=256, max_len=2048, num_layers=24, num_heads=16, num_kv_heads=4,
                           d_model=2048, d_ff=5632, positions="rotary", mlp="swiglu", norm="rms", remat=True),
}
# (batch, seq, steps, peak lr, warmup) per named config.
TRAINING = {"tiny": (32, 128, 500, 3e-3, 50), "gpt2-124m": (16, 1024, 5000, 6e-4, 500),
            "gpt2-350m": (16, 1024, 5000, 3e-4, 500), "1b": (32, 2048, 10000, 2e-4, 1000)}
TRAINING["nano"] = TRAINING["tiny"]
# Dense bf16 peak FLOP/s per device, for MFU.
PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "TPU v4": 275e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v6": 918e12}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    config: str = "tiny"
    data: str = ""
    max_bytes: int = 4 << 20
    steps: int = 0
    batch_size: int = 0
    seq_len: int = 0
    learning_rate: float = 0.0
    weight_decay: float = 0.1
    dtype: str = "float32"  # compute dtype: float32, bfloat16, or float16 (dynamic loss scaling)
    fused_loss: bool = True
    mesh: str = "data=-1"
    rules: str = "data"
    microbatches: int = 1  # pipeline microbatches (a ``stage`` mesh axis)
    repeats: int = 1  # pipeline repeats per stage (circular schedule)
    remat: bool = False  # rematerialise in the backward pass (per stage in a pipeline)
    out: str = "runs/gpt"
    resume: bool = False
    eval_every: int = 100
    eval_windows: int = 64
    seed: int = 0
    progress: bool = True
    generate: str = ""
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=-1,fsdp=2"`` -> ``{"data": -1, "fsdp": 2}``."""
    axes = {}
    for part in filter(None, text.split(",")):
        name, _, size = part.partition("=")
        try:
            axes[name.strip()] = int(size)
        except ValueError:
            raise ValueError(f"gpt: --mesh takes name=size pairs like data=-1,fsdp=2, got {text!r}") from None
    return axes


def flops_per_token(model_config: models.GPTConfig, num_params: int, seq_len: int) -> float:
    """6N + 12 L H Dh T (the PaLM / nanoGPT count)."""
    c = model_config
    return 6 * num_params + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len


def check_layout(run: RunConfig, model_config: models.GPTConfig, mesh) -> str:
    """Refuses, before anything compiles, a pipeline or context-parallel layout the
    model and batch cannot take; returns a line describing it ("" for neither)."""
    lines = []
    data_ways = math.prod(mesh.shape.get(a, 1) for a in ("data", "fsdp"))
    if run.batch_size % data_ways:
        raise ValueError(f"gpt: batch {run.batch_size} does not divide over the data axes ({data_ways} ways) of "
                         f"--mesh {run.mesh}")
    stages = mesh.shape.get("stage", 1)
    if stages > 1:
        models.pipeline.check_pipeline(num_layers=model_config.num_layers, stages=stages, repeats=run.repeats,
                                       microbatches=run.microbatches, batch=run.batch_size, data_ways=data_ways)
        bubble = models.pipeline.bubble_fraction(stages, run.microbatches, run.repeats)
        lines.append(f"pipeline: {stages} stages x {run.repeats} repeat(s) of "
                     f"{model_config.num_layers // (stages * run.repeats)} layer(s), {run.microbatches} microbatches "
                     f"of {run.batch_size // run.microbatches}: bubble (idle fraction, analytic) {bubble:.1%}")
    context = mesh.shape.get("seq", 1)
    if context > 1:
        if run.seq_len % context:
            raise ValueError(f"gpt: the sequence length {run.seq_len} does not divide over the seq axis ({context}) "
                             f"of --mesh {run.mesh}")
        lines.append(f"context parallel: the {run.seq_len} positions split over seq={context} "
                     f"({run.seq_len // context} per device), ring attention")
    return "\n".join(lines)


def build(run: RunConfig):
    if run.config not in MODEL_CONFIGS:
        raise ValueError(f"gpt: --config must be one of {sorted(MODEL_CONFIGS)}, got {run.config!r}")
    if run.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"gpt: --dtype must be float32, bfloat16 or float16, got {run.dtype!r}")
    batch, seq, steps, lr, warmup = TRAINING[run.config]
    vocab_size = MODEL_CONFIGS[run.config].vocab_size
    if data.is_pack(run.data):  # a packed corpus: its rows set the length, its tokenizer the vocabulary
        pack = data.read_pack(run.data)
        if run.seq_len and run.seq_len != pack["seq_len"] - 1:
            raise ValueError(f"gpt: --seq_len {run.seq_len} does not match the pack in {run.data}, whose rows of "
                             f"{pack['seq_len']} ids train {pack['seq_len'] - 1} positions")
        seq, vocab_size = pack["seq_len"] - 1, pack["vocab_size"]
    run = dataclasses.replace(run, batch_size=run.batch_size or batch, seq_len=run.seq_len or seq,
                              steps=run.steps or steps, learning_rate=run.learning_rate or lr)
    pipelined = parse_mesh(run.mesh).get("stage", 1) != 1
    if not pipelined and (run.microbatches != 1 or run.repeats != 1):
        raise ValueError(f"gpt: --microbatches {run.microbatches} and --repeats {run.repeats} need a pipeline: "
                         f"a stage axis in --mesh (e.g. stage=2,data=-1), got --mesh {run.mesh!r}")
    base = MODEL_CONFIGS[run.config]
    model_config = dataclasses.replace(base, dtype=jnp.dtype(run.dtype), fused_loss=run.fused_loss,
                                       max_len=max(base.max_len, run.seq_len), vocab_size=vocab_size,
                                       remat=base.remat or run.remat, scan_layers=pipelined,
                                       pipeline_microbatches=run.microbatches, pipeline_repeats=run.repeats)
    schedule = optim.ScheduleConfig(name="cosine", peak_lr=run.learning_rate,
                                    warmup_steps=min(warmup, run.steps // 5), total_steps=run.steps,
                                    end_lr=run.learning_rate / 10)
    tx = optim.make_optimizer(optim.OptimizerConfig(name="adamw", learning_rate=schedule, b2=0.95,
                                                    weight_decay=run.weight_decay, decay_mask="auto", clip_norm=1.0))
    return run, models.GPT(model_config), tx


def train_run(run: RunConfig, extra_hooks: Sequence[train.Hook] = ()) -> dict:
    """Trains (``extra_hooks`` join the recipe's) and returns the summary."""
    run, model, tx = build(run)
    model_inputs: tuple[str, ...] = ()
    if data.is_pack(run.data):  # packed shards streamed by Grain; documents kept apart by segment ids
        batches = data.GrainLoader(data.ArrayRecords(os.path.join(run.data, "train")), batch_size=run.batch_size,
                                   seed=run.seed, transforms=[data.lm_example])
        val_rows = data.ArrayRecords(os.path.join(run.data, "val"))
        if not len(val_rows):
            raise ValueError(f"gpt: the pack in {run.data} has no validation rows; pack it with --val-fraction > 0 "
                             "from two or more documents")
        examples = [data.lm_example(val_rows[i]) for i in range(min(len(val_rows), run.eval_windows))]
        val = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        model_inputs = ("segment_ids",)
        pack = data.read_pack(run.data)
        corpus = (f"packed corpus {run.data}: {pack['documents']:,} documents, {pack['tokens']:,} tokens, "
                  f"tokenizer {pack['tokenizer']}")
    else:
        tokens = data.load_bytes(run.data.split(",") if run.data else None, max_bytes=run.max_bytes)
        train_tokens, val_tokens = data.split_tokens(tokens, 0.05)
        batches = data.TokenWindows(train_tokens, run.batch_size, run.seq_len, seed=run.seed)
        val = data.eval_windows(val_tokens, run.seq_len, run.eval_windows)
        corpus = (f"corpus {len(tokens) / 1e6:.1f} MB ({len(train_tokens):,} train / {len(val_tokens):,} "
                  "held-out bytes)")

    mesh = parallel.make_mesh(parse_mesh(run.mesh))
    rules = parallel.get_rules(run.rules)
    print(f"{parallel.describe_mesh(mesh)} | rules {run.rules}: "
          + ", ".join(f"{name}->{target}" for name, target in parallel.restrict_to_mesh(rules, mesh)))
    layout = check_layout(run, model.config, mesh)
    if layout:
        print(layout)
    example = np.zeros((run.batch_size, run.seq_len), np.int32)
    state, shardings = parallel.create_sharded_train_state(
        model, tx, example, mesh, rules, seed=run.seed, loss_scale="dynamic" if run.dtype == "float16" else None)
    sharded_step = parallel.make_sharded_train_step(model, tx, models.lm_loss, mesh, rules, shardings,
                                                    input_key="inputs", model_inputs=model_inputs)
    step = lambda state, batch: sharded_step(state, parallel.shard_batch(batch, mesh, rules))  # noqa: E731
    eval_step = train.make_eval_step(model, models.lm_loss, input_key="inputs", model_inputs=model_inputs)

    num_params = train.count_params(state.params)
    tokens_per_step = run.batch_size * run.seq_len
    flops = flops_per_token(model.config, num_params, run.seq_len) * tokens_per_step
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)
    print(f"model {run.config}: {num_params / 1e6:.2f}M params, {model.config.dtype.name} compute | {corpus}")
    started = time.perf_counter()
    hooks = [
        train.Preemption(),
        *([train.ProgressBar()] if run.progress else []),
        train.TrainMetrics(every=max(1, min(50, run.eval_every))),
        train.Throughput(tokens_per_step=tokens_per_step, flops_per_step=flops,
                         peak_flops=peak * mesh.devices.size if peak else None),
        train.Evaluate(eval_step, val, every=run.eval_every, batch_size=min(run.batch_size, len(val["inputs"])),
                       transform=lambda m: {"bits_per_byte": m["loss"] / math.log(2)}),
        train.Checkpoint(run.out, every=run.eval_every, resume=run.resume,
                         extra={"config": config_lib.to_dict(run) | {"dtype": run.dtype}},
                         logical_axes=parallel.param_logical_axes(model, example)),
        train.MetricFiles(run.out),
        train.PlotCurves(run.out),
        *extra_hooks,
    ]
    result = train.fit(state, step, batches, num_steps=run.steps, hooks=hooks)
    seconds = time.perf_counter() - started
    bpb = result.eval_metrics["bits_per_byte"]
    summary = {"config": run.config, "steps": int(result.state.step), "val_bits_per_byte": bpb,
               "train_seconds": seconds, "num_params": num_params, "resumed_from": result.resumed_from,
               "preempted": result.preempted, "stop_reason": result.stop_reason,
               "pipeline_bubble": (models.pipeline.bubble_fraction(mesh.shape["stage"], run.microbatches, run.repeats)
                                   if mesh.shape.get("stage", 1) > 1 else None),
               "val_metrics": {k: float(v) for k, v in result.eval_metrics.items() if np.ndim(v) == 0}}
    with open(os.path.join(run.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"validation {bpb:.3f} bits/byte after {summary['steps']} steps, {seconds:.0f}s | outputs in {run.out}")
    return summary


def _per_layer(params: dict, model: models.GPT) -> tuple[dict, models.GPT]:
    """Decoding and export take per-layer parameters: a pipeline run's stacked
    ``blocks`` are split back into ``block_i``."""
    if "blocks" in params:
        params = models.unstack_layers(params)
    return params, model.clone(config=dataclasses.replace(model.config, scan_layers=False))


def generate_run(run: RunConfig) -> str:
    run, model, _ = build(run)
    params = checkpoint.restore(os.path.join(run.out, "checkpoints"), params_only=True)  # the latest step
    params, model = _per_layer(params, model)
    tokenizer = data.pack_tokenizer(run.data) if data.is_pack(run.data) else None
    vocabulary = params["embedding"].shape[0]
    if tokenizer is not None and tokenizer.vocab_size > vocabulary:
        raise ValueError(f"gpt: the tokenizer of {run.data} has {tokenizer.vocab_size} ids but the model in {run.out} "
                         f"has a vocabulary of {vocabulary}")
    if tokenizer is None and vocabulary < 256:
        raise ValueError(f"gpt: byte-level generation needs a vocabulary of 256 or more; the model in {run.out} "
                         f"has {vocabulary} (give --data, the pack it was trained on)")
    model = model.clone(config=dataclasses.replace(model.config, vocab_size=vocabulary))
    encode = tokenizer.encode if tokenizer is not None else data.ByteTokenizer().encode
    prompt = encode(run.generate)[None]
    room = model.config.max_len - prompt.shape[1]
    out = models.generate(model, params, prompt, min(run.max_new_tokens, room),
                          temperature=run.temperature, top_k=run.top_k, seed=run.seed)
    decode = tokenizer.decode if tokenizer is not None else data.ByteTokenizer().decode
    text = decode(np.asarray(out[0]))
    print(text)
    return text


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if config_lib.print_help(argv, __doc__, RunConfig()):
        return None
    run = config_lib.override(RunConfig(), argv)
    return generate_run(run) if run.generate else train_run(run)


def export(manager: checkpoint.CheckpointManager, step: int, config: dict) -> registry.ExportParts:
    """The trained GPT for ``export_recipe``: tokens ``int32[b, seq_len]`` ->
    next-token logits ``[b, seq_len, vocab]``, plus a KV-cache decode step."""
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    run, model, _ = build(RunConfig(**{k: v for k, v in config.items() if k in fields}))
    # "auto" picks a kernel from the exporting machine's backend at trace time;
    # an artifact lowered for several platforms needs the portable XLA path.
    model = model.clone(config=dataclasses.replace(model.config, attention_implementation="xla",
                                                   norm_implementation="xla"))
    params, model = _per_layer(manager.restore(step, params_only=True), model)

    def gpt_logits(variables, tokens_BxS):
        return model.apply(variables, tokens_BxS, train=False)

    def calibration() -> list[np.ndarray]:  # training-split windows of the recipe's corpus
        tokens = data.load_bytes(run.data.split(",") if run.data else None, max_bytes=run.max_bytes)
        windows = data.eval_windows(data.split_tokens(tokens, 0.05)[0], run.seq_len, 32)["inputs"]
        return [windows[i:i + 8] for i in range(0, len(windows), 8)]

    return registry.ExportParts(
        apply_fn=gpt_logits, variables={"params": params}, example_inputs=np.zeros((1, run.seq_len), np.int32),
        input_names=("tokens",), output_names=("logits",), model=model, config=config, calibration=calibration,
        # One static scale per activation, shared over batch and positions.
        quantize_options={"module_path": models.GPT_QUANTIZED_MODULES, "act_batch_axes": (0, 1)},
        decoder="bytes")


RECIPE = registry.Recipe(name="gpt", main=main, export=export, config=RunConfig(), run=train_run,
                         description="a byte-level GPT on text (tiny to gpt2-124m configs), any mesh")

if __name__ == "__main__":
    main()
