"""Serving load test: throughput and latency with dynamic batching on and off.

    python -m benchmarks.serve_load                        # JSON to benchmarks/results/
    python -m benchmarks.serve_load --clients 8 --requests 50 --out /tmp/s.json

Exports the digits CNN (random weights: speed does not depend on them),
starts the server in this process on 127.0.0.1 (uvicorn), and runs
``--clients`` concurrent clients, each sending ``--requests`` one-image
requests back to back, twice: with dynamic batching (``--max-batch``,
``--max-wait-ms``) and without (``max_batch=1``). Reports requests/s and
p50/p99 latency for each, and the mean rows per model call. Bounded: at most
``clients * requests`` requests per run and ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import tempfile
import threading
import time

import httpx
import jax
import numpy as np
import uvicorn

from benchmarks import free_port, write_result
from lepton_jax import models
from lepton_jax.export import export_model
from lepton_jax.serve import create_app


def _export(root: str) -> str:
    model = models.CNN()
    images = np.zeros((1, 8, 8, 1), np.float32)
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    model_dir = os.path.join(root, "digits")
    export_model(model_dir, lambda v, x: model.apply(v, x, train=False), variables, images, platforms=("cpu",),
                 output_names=("logits",))
    return model_dir


async def _clients(url: str, clients: int, requests: int, timeout: float) -> list[float]:
    image = np.random.default_rng(0).uniform(0, 16, (1, 8, 8, 1)).tolist()
    latencies: list[float] = []
    deadline = time.monotonic() + timeout

    async def one_client(client: httpx.AsyncClient) -> None:
        for _ in range(requests):
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            response = await client.post("/v1/models/digits:predict", json={"instances": image})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        await asyncio.gather(*[one_client(client) for _ in range(clients)])
    return latencies


def run_once(model_dir: str, *, max_batch: int, max_wait_ms: float, clients: int, requests: int,
             timeout: float) -> dict:
    app = create_app([model_dir], max_batch=max_batch, max_wait_ms=max_wait_ms)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    asyncio.run(_clients(url, clients, 5, timeout))  # warm the connections
    start = time.perf_counter()
    latencies = asyncio.run(_clients(url, clients, requests, timeout))
    seconds = time.perf_counter() - start
    metrics = httpx.get(f"{url}/metrics").text
    server.should_exit = True
    thread.join(timeout=60)
    calls = rows = 0.0
    for line in metrics.splitlines():
        if line.startswith("lepton_batch_size_count"):
            calls = float(line.split()[-1])
        elif line.startswith("lepton_batch_size_sum"):
            rows = float(line.split()[-1])
    ordered = sorted(latencies)
    return {"max_batch": max_batch, "max_wait_ms": max_wait_ms, "requests": len(latencies), "seconds": seconds,
            "requests_per_second": len(latencies) / seconds,
            "latency_ms": {"p50": statistics.median(ordered) * 1e3,
                           "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3},
            "mean_rows_per_call": rows / calls if calls else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run, at most")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as root:
        model_dir = _export(root)
        batched = run_once(model_dir, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, clients=args.clients,
                           requests=args.requests, timeout=args.timeout)
        unbatched = run_once(model_dir, max_batch=1, max_wait_ms=0.0, clients=args.clients, requests=args.requests,
                             timeout=args.timeout)
    result = {
        "bench": "serve_load", "date": datetime.date.today().isoformat(),
        "device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
        "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
        "versions": {"jax": jax.__version__, "uvicorn": uvicorn.__version__, "httpx": httpx.__version__},
        "model": "digits CNN (lepton_jax.models.CNN), one 8x8x1 image per request",
        "clients": args.clients, "requests_per_client": args.requests,
        "batching_on": batched, "batching_off": unbatched,
        "throughput_ratio": batched["requests_per_second"] / unbatched["requests_per_second"],
    }
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"serve_load_{result['date']}.json")
    print(json.dumps(result, indent=2))
    write_result(result, out)
    return result


if __name__ == "__main__":
    main()
