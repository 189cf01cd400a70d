"""The pipeline bubble, measured, and context-parallel memory per device, on 8 simulated CPU devices.

    python -m benchmarks.pipeline_context            # writes benchmarks/results/pipeline_context_<date>.json

Pipeline: a GPT of 8 blocks (d_model 64, 4 heads, seq 64, batch 64) whose
stacked blocks run as a pipeline over ``stage=N`` (N = 2, 4, 8; the rest of
the 8 devices are ``data``) with M = 1, 2, 4, 8, 16 microbatches. One jitted
forward + backward (``value_and_grad`` of the LM loss) per layout; its median
wall time over ``--repeats`` calls is compared with the same model, batch
and step on ``data=8`` (no pipeline), measured in the same process.

Why the ratio measures the bubble here: the 8 simulated devices share this
machine's CPU cores, so wall time follows the total work done. The schedule
runs ``M + N - 1`` iterations in which every stage computes (idle slots
compute on zeros whose results are dropped), ``N (M + N - 1)`` stage-steps
for ``N M`` useful ones. So ``t_pipeline / t_data`` should be
``(M + N - 1) / M`` and the measured idle fraction ``1 - t_data /
t_pipeline`` should be the analytic ``(N - 1) / (M + N - 1)``. On real
accelerators the idle slots cost time instead of work, and the fraction is
the same. Overheads the formula leaves out (the per-iteration loop, the
collective permutes, small microbatches using the cores less well) show up
as the difference.

Context parallelism: a GPT of 2 blocks on sequences of 2048, batch 2, on
``seq=S`` (S = 1, 2, 4, 8) devices: the compiled step's temporary memory per
device (``memory_analysis().temp_size_in_bytes``) against ``seq=1``.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import flax.linen as linen  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from lepton_jax import models, parallel  # noqa: E402
from lepton_jax.models import pipeline as pipeline_lib  # noqa: E402

PIPE_CONFIG = models.GPTConfig(vocab_size=256, max_len=64, num_layers=8, num_heads=4, d_model=64, d_ff=256,
                               positions="rotary", scan_layers=True)
CONTEXT_CONFIG = models.GPTConfig(vocab_size=256, max_len=2048, num_layers=2, num_heads=4, d_model=64, d_ff=256,
                                  positions="rotary")


def _step(config: models.GPTConfig, axes: dict[str, int], tokens: np.ndarray):
    """The compiled value_and_grad of the LM loss on ``axes`` and its arguments."""
    model = models.GPT(config)
    devices = jax.devices()[:int(np.prod(list(axes.values())))]
    mesh = parallel.make_mesh(axes, devices=devices)
    rules = parallel.restrict_to_mesh(parallel.get_rules("data"), mesh)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch["inputs"])["params"])
    params = jax.jit(lambda: linen.meta.unbox(model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]),
                     out_shardings=parallel.param_shardings(boxed, mesh, rules))()

    def loss(params, batch):
        return models.lm_loss(model.apply({"params": params}, batch["inputs"]), batch)

    with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
        sharded = parallel.shard_batch(batch, mesh, rules)
        compiled = jax.jit(jax.value_and_grad(loss)).trace(params, sharded).lower().compile()
    return compiled, (params, sharded)


def _median_seconds(compiled, args, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default=f"benchmarks/results/pipeline_context_{datetime.date.today()}.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, size=(args.batch, PIPE_CONFIG.max_len + 1)).astype(np.int32)
    result = {"device": f"{jax.device_count()} simulated {jax.devices()[0].platform} devices on "
                        f"{os.cpu_count()} cores", "jax": jax.__version__, "batch": args.batch,
              "pipeline_model": {"layers": PIPE_CONFIG.num_layers, "d_model": PIPE_CONFIG.d_model,
                                 "seq": PIPE_CONFIG.max_len},
              "pipeline": [], "context": []}

    def save():
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)

    compiled, call_args = _step(dataclasses.replace(PIPE_CONFIG, scan_layers=False), {"data": 8}, tokens)
    reference = _median_seconds(compiled, call_args, args.repeats)
    result["data8_seconds"] = reference
    print(f"data=8 reference step: {reference * 1e3:.1f} ms", flush=True)
    for stages in (2, 4, 8):
        for microbatches in (1, 2, 4, 8, 16):
            data = 8 // stages
            if args.batch % (microbatches * data):
                continue
            config = dataclasses.replace(PIPE_CONFIG, pipeline_microbatches=microbatches)
            started = time.perf_counter()
            compiled, call_args = _step(config, {"stage": stages, "data": data}, tokens)
            compile_s = time.perf_counter() - started
            seconds = _median_seconds(compiled, call_args, args.repeats)
            analytic = pipeline_lib.bubble_fraction(stages, microbatches)
            row = {"stages": stages, "data": data, "microbatches": microbatches, "seconds": seconds,
                   "compile_seconds": compile_s, "analytic_bubble": analytic,
                   "measured_bubble": 1 - reference / seconds,
                   "predicted_slowdown": (microbatches + stages - 1) / microbatches,
                   "measured_slowdown": seconds / reference}
            result["pipeline"].append(row)
            print(f"stage={stages} M={microbatches:2d}: {seconds * 1e3:7.1f} ms, bubble analytic {analytic:.3f} "
                  f"measured {row['measured_bubble']:.3f}", flush=True)
            save()

    long_tokens = rng.integers(0, 256, size=(2, CONTEXT_CONFIG.max_len + 1)).astype(np.int32)
    for seq in (1, 2, 4, 8):
        compiled, _ = _step(CONTEXT_CONFIG, {"seq": seq}, long_tokens)
        temp = compiled.memory_analysis().temp_size_in_bytes
        base = result["context"][0]["temp_bytes"] if result["context"] else temp
        result["context"].append({"seq": seq, "seq_len": CONTEXT_CONFIG.max_len, "temp_bytes": temp,
                                  "ratio_to_seq1": temp / base, "ideal_ratio": 1 / seq})
        print(f"seq={seq}: temp {temp / 2**20:.1f} MiB per device ({temp / base:.3f} of seq=1)", flush=True)
        save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
