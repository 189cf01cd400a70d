"""Attention benchmark: ours against cuDNN, XLA and JAX's bundled Pallas mha, in one process.

    python -m benchmarks.attention                      # GPU: the issue's grid, JSONL to benchmarks/results/
    python -m benchmarks.attention --smoke --out /tmp/a.jsonl   # CPU: tiny shapes, checks the script

For B*S = 16384 and H*D = 2048, S in {1024, 4096, 16384}, D in {64, 128},
causal and not, bf16: times the forward and forward+backward (value and
grads of q, k, v) as medians over repeats after warm-up, rotating among input
sets, and reports TFLOP/s with FLOPs = 4*B*H*S^2*D (halved when causal,
x3.5 for forward+backward). Each implementation's output is first checked
against an fp32 reference on fresh inputs (relative error in the record).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax import ops


def _implementations(smoke: bool) -> dict[str, Callable]:
    impls = {
        "lepton_pallas": lambda q, k, v, causal: ops.attention(q, k, v, causal=causal, implementation="pallas"),
        "xla": lambda q, k, v, causal: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"),
    }
    if not smoke:
        impls["cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")
        try:
            from jax.experimental.pallas.ops.gpu import attention as jax_mha

            impls["jax_pallas_mha"] = lambda q, k, v, causal: jax_mha.mha(q, k, v, segment_ids=None, causal=causal)
        except ImportError as e:  # recorded, not fatal
            print(f"jax_pallas_mha unavailable: {e}", file=sys.stderr)
    return impls


def _time(fn, inputs_list, repeats: int) -> float:
    """Median milliseconds of ``fn(*inputs)``, rotating among input sets."""
    for inputs in inputs_list:  # warm-up and compile
        jax.block_until_ready(fn(*inputs))
    samples = []
    for r in range(repeats):
        inputs = inputs_list[r % len(inputs_list)]
        start = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def run(configs, impls, *, dtype, repeats: int, out_path: str | None) -> list[dict]:
    device = jax.devices()[0]
    records = []
    for S, D, causal, B, H in configs:
        flops = 4 * B * H * S * S * D * (0.5 if causal else 1.0)
        keys = jax.random.split(jax.random.PRNGKey(S + D + causal), 3)

        def make(key):
            kq, kk, kv, kd = jax.random.split(key, 4)
            shape = (B, S, H, D)
            return tuple(jax.random.normal(kk_, shape, dtype) for kk_ in (kq, kk, kv, kd))

        inputs_list = [make(k) for k in keys]
        check = make(jax.random.PRNGKey(12345))
        reference = jax.jit(lambda q, k, v: ops.attention_reference(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), causal=causal))
        ref_out = reference(*check[:3]) if S <= 4096 else None
        for name, impl in impls.items():
            record = {"bench": "attention", "impl": name, "S": S, "D": D, "causal": causal, "B": B, "H": H,
                      "dtype": jnp.dtype(dtype).name, "device": device.device_kind, "platform": device.platform,
                      "jax_version": jax.__version__, "date": datetime.date.today().isoformat()}
            try:
                fwd = jax.jit(lambda q, k, v, d, impl=impl: impl(q, k, v, causal))

                def loss(q, k, v, d, impl=impl):
                    return jnp.sum(impl(q, k, v, causal).astype(jnp.float32) * d.astype(jnp.float32))

                fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
                if ref_out is not None:
                    record["rel_error_vs_fp32"] = _relative_error(fwd(*check), ref_out)
                record["fwd_ms"] = _time(fwd, inputs_list, repeats)
                record["fwdbwd_ms"] = _time(fwd_bwd, inputs_list, repeats)
                record["fwd_tflops"] = flops / record["fwd_ms"] / 1e9
                record["fwdbwd_tflops"] = 3.5 * flops / record["fwdbwd_ms"] / 1e9
            except Exception as e:  # an implementation that cannot run a config is recorded, not fatal
                record["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            records.append(record)
            print(json.dumps(record), flush=True)
            if out_path:
                with open(out_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
    return records


def _table(records: list[dict]) -> str:
    lines = [f"{'S':>6} {'D':>4} {'causal':>6} {'impl':>15} {'fwd TF/s':>9} {'f+b TF/s':>9} {'vs cudnn f+b':>12}"]
    cudnn = {(r["S"], r["D"], r["causal"]): r.get("fwdbwd_tflops") for r in records if r["impl"] == "cudnn"}
    for r in records:
        base = cudnn.get((r["S"], r["D"], r["causal"]))
        ratio = f"{r['fwdbwd_tflops'] / base:.2f}" if base and "fwdbwd_tflops" in r else "-"
        lines.append(f"{r['S']:>6} {r['D']:>4} {str(r['causal']):>6} {r['impl']:>15} "
                     f"{r.get('fwd_tflops', float('nan')):>9.1f} {r.get('fwdbwd_tflops', float('nan')):>9.1f} {ratio:>12}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, ours and XLA only (CPU check)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSONL path (default: benchmarks/results/attention_<date>.jsonl)")
    args = parser.parse_args(argv)
    if args.smoke:
        configs = [(32, 64, causal, 2, 2) for causal in (False, True)]
        dtype, repeats = jnp.float32, 2
    else:
        configs = [(S, D, causal, 16384 // S, 2048 // D)
                   for S in (1024, 4096, 16384) for D in (64, 128) for causal in (False, True)]
        dtype, repeats = jnp.bfloat16, args.repeats
    out_path = args.out
    if out_path is None and not args.smoke:
        os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
        out_path = os.path.join(os.path.dirname(__file__), "results",
                                f"attention_{datetime.date.today().isoformat()}.jsonl")
    records = run(configs, _implementations(args.smoke), dtype=dtype, repeats=repeats, out_path=out_path)
    print(_table(records))


if __name__ == "__main__":
    main()
