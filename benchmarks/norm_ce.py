"""Norm and linear cross-entropy benchmark: ours against XLA, in one process.

    python -m benchmarks.norm_ce                          # GPU: the issue's shapes, JSONL to benchmarks/results/
    python -m benchmarks.norm_ce --smoke --out /tmp/n.jsonl   # CPU: tiny shapes, checks the script

Norms (bf16 x [16384, 4096], [16384, 1024], [8192, 8192]): effective TB/s,
counting x read + y written forward and x, dy read + dx written backward
(scale/bias and statistics are negligible), for ``implementation="pallas"``
and the XLA-fused jnp twin. Linear cross-entropy (16384 x 768 x 50304,
bf16): value_and_grad time and compiled temp memory for ours ("chunked")
and the unfused ``x @ w`` + log-softmax.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import ops


def _median_ms(fn, inputs_list, repeats):
    for inputs in inputs_list:
        jax.block_until_ready(fn(*inputs))
    samples = []
    for r in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs_list[r % len(inputs_list)]))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _base_record(bench, impl):
    device = jax.devices()[0]
    return {"bench": bench, "impl": impl, "device": device.device_kind, "platform": device.platform,
            "jax_version": jax.__version__, "date": datetime.date.today().isoformat()}


def _rel_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_norms(shapes, repeats, dtype):
    records = []
    for shape in shapes:
        rows, hidden = shape
        keys = jax.random.split(jax.random.PRNGKey(rows + hidden), 3)
        inputs_list = [(jax.random.normal(k, shape, dtype), jax.random.normal(jax.random.fold_in(k, 1), shape, dtype))
                       for k in keys]
        scale = jnp.linspace(0.5, 1.5, hidden, dtype=jnp.float32)
        bias = jnp.linspace(-0.1, 0.1, hidden, dtype=jnp.float32)
        itemsize = jnp.dtype(dtype).itemsize
        bytes_fwd = 2 * rows * hidden * itemsize
        bytes_bwd = 3 * rows * hidden * itemsize
        for op in ("layer_norm", "rms_norm"):
            for impl_name, implementation in (("lepton_pallas", "pallas"), ("xla", "xla")):
                def norm(x, implementation=implementation, op=op):
                    if op == "layer_norm":
                        return ops.layer_norm(x, scale, bias, implementation=implementation)
                    return ops.rms_norm(x, scale, implementation=implementation)

                fwd = jax.jit(lambda x, dy, norm=norm: norm(x))
                fwd_bwd = jax.jit(lambda x, dy, norm=norm: jax.vjp(norm, x)[1](dy)[0])
                record = {**_base_record("norm", impl_name), "op": op, "shape": list(shape),
                          "dtype": jnp.dtype(dtype).name}
                try:
                    check_x, check_dy = inputs_list[0]
                    reference = lambda x: ops.layer_norm(x.astype(jnp.float32), scale, bias, implementation="xla") \
                        if op == "layer_norm" else ops.rms_norm(x.astype(jnp.float32), scale, implementation="xla")  # noqa: E731
                    record["rel_error_vs_fp32"] = _rel_error(fwd(check_x, check_dy), reference(check_x))
                    record["fwd_ms"] = _median_ms(fwd, inputs_list, repeats)
                    record["fwdbwd_ms"] = _median_ms(fwd_bwd, inputs_list, repeats)
                    record["fwd_tb_s"] = bytes_fwd / record["fwd_ms"] / 1e9
                    record["fwdbwd_tb_s"] = (bytes_fwd + bytes_bwd) / record["fwdbwd_ms"] / 1e9
                except Exception as e:
                    record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                records.append(record)
                print(json.dumps(record), flush=True)
    return records


def bench_linear_ce(tokens, hidden, vocab, repeats, dtype):
    records = []
    keys = jax.random.split(jax.random.PRNGKey(7), 3)

    def make(k):
        kx, kw, kl = jax.random.split(k, 3)
        return (jax.random.normal(kx, (tokens, hidden), dtype),
                (jax.random.normal(kw, (hidden, vocab)) / np.sqrt(hidden)).astype(dtype),
                jax.random.randint(kl, (tokens,), 0, vocab))

    inputs_list = [make(k) for k in keys]
    for impl_name, implementation in (("lepton_chunked", "chunked"), ("xla_unfused", "xla")):
        step = jax.jit(jax.value_and_grad(
            lambda x, w, l, implementation=implementation: ops.linear_cross_entropy(
                x, w, l, implementation=implementation), argnums=(0, 1)))
        record = {**_base_record("linear_ce", impl_name), "tokens": tokens, "hidden": hidden, "vocab": vocab,
                  "dtype": jnp.dtype(dtype).name}
        try:
            compiled = step.lower(*inputs_list[0]).compile()
            record["temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            record["ms"] = _median_ms(step, inputs_list, repeats)
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        records.append(record)
        print(json.dumps(record), flush=True)
    return records


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        records = bench_norms([(64, 256)], 2, jnp.float32) + bench_linear_ce(256, 32, 1000, 2, jnp.float32)
    else:
        records = (bench_norms([(16384, 4096), (16384, 1024), (8192, 8192)], args.repeats, jnp.bfloat16)
                   + bench_linear_ce(16384, 768, 50304, args.repeats, jnp.bfloat16))
    out = args.out
    if out is None and not args.smoke:
        os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
        out = os.path.join(os.path.dirname(__file__), "results", f"norm_ce_{datetime.date.today().isoformat()}.jsonl")
    if out:
        with open(out, "a", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    for r in records:
        figures = {k: round(v, 3) for k, v in r.items() if k.endswith(("_tb_s", "ms")) or k == "temp_bytes"}
        print(r["bench"], r.get("op", ""), r.get("shape", ""), r["impl"], figures, r.get("error", ""))


if __name__ == "__main__":
    main()
