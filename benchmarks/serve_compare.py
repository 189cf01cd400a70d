"""lepton-jax serve against KServe's own Python model server, side by side.

    python -m benchmarks.serve_compare --kserve-python /tmp/kserve-venv/bin/python
    python -m benchmarks.serve_compare --kserve-python ... --seconds 3 --out /tmp/s.json   # a quick check

Both servers serve the same digits CNN export (``lepton_jax.export``): ours
is ``lepton-jax serve`` (dynamic batching, orjson); the peer is a
``kserve.Model`` whose ``predict`` calls ``lepton_jax.export.load(dir)``
(KServe's documented way to serve a custom model), run by
``kserve.ModelServer``. The same asyncio client (raw HTTP/1.1, keep-alive) sends
one-image requests from 32 and 64 concurrent users, with KServe v1
(``{"instances"}``) and v2 (Open Inference Protocol JSON) payloads, for a fixed
time after a warm-up; reported per case: requests per second, p50 and p99
latency, errors, and our ratio to KServe. Client and servers share the
machine's cores, as they would on one node.

``kserve`` is not a dependency of lepton_jax (it pins its own protobuf,
fastapi, ...): give a Python that has it and sees jax, e.g. a venv made with
``pip install kserve`` and a ``.pth`` line pointing at this project's
site-packages. JSON to ``benchmarks/results/serve_compare_<date>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import httpx
import jax
import numpy as np

from benchmarks import free_port, write_result
from lepton_jax import models
from lepton_jax.export import export_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = '''
import sys
import uuid
import numpy as np
import kserve
from kserve import InferOutput, InferRequest, InferResponse
from lepton_jax.export import load


class Digits(kserve.Model):
    def __init__(self, name, path):
        super().__init__(name)
        self.model = load(path)
        self.ready = True

    def predict(self, payload, headers=None, response_headers=None):
        if isinstance(payload, InferRequest):
            logits = np.asarray(self.model(payload.inputs[0].as_numpy()))
            output = InferOutput(name="logits", shape=list(logits.shape), datatype="FP32")
            output.set_data_from_numpy(logits, binary_data=False)
            return InferResponse(response_id=payload.id or str(uuid.uuid4()), model_name=self.name,
                                 infer_outputs=[output])
        logits = np.asarray(self.model(np.asarray(payload["instances"], np.float32)))
        return {"predictions": logits.tolist()}


if __name__ == "__main__":
    kserve.ModelServer(http_port=int(sys.argv[2]), enable_grpc=False).start([Digits("digits", sys.argv[1])])
'''


def export_digits_cnn(out_dir: str) -> str:
    """The digits recipe's CNN (initialised: serving speed does not depend on the weights)."""
    model = models.CNN()
    example = np.zeros((1, 8, 8, 1), np.float32)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(example)
    export_model(out_dir, lambda v, x: model.apply(v, x, train=False), variables, example, platforms=("cpu",),
                 preprocessing={"normalize": {"mean": 4.9, "std": 6.0}}, output_names=("logits",))
    return out_dir


def _wait_ready(url: str, process: subprocess.Popen, log: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            with open(log) as file:
                raise RuntimeError(f"the server at {url} exited: {file.read()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server at {url} did not get ready")
        time.sleep(0.5)


def _bodies(image: np.ndarray) -> dict[str, tuple[str, dict]]:
    return {"v1": ("/v1/models/digits:predict", {"instances": image[None].tolist()}),
            "v2": ("/v2/models/digits/infer", {"inputs": [{"name": "inputs", "shape": [1, 8, 8, 1],
                                                           "datatype": "FP32", "data": image.ravel().tolist()}]})}


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One HTTP/1.1 request on a kept-alive connection; returns the status."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head:
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    return status


async def _load(url: str, path: str, body: dict, users: int, seconds: float) -> dict:
    """``users`` connections each sending requests back to back. The client is
    raw asyncio streams with the request bytes made once, so that it spends
    as little of the shared CPU as a client can (httpx costs more per
    request than these servers do)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
    latencies: list[float] = []
    errors = 0

    async def user(stop_at: float, record: bool) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                status = await _exchange(reader, writer, request)
                if record:
                    if status == 200:
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(user(time.perf_counter() + 1.0, False) for _ in range(users)))  # warm-up
    started = time.perf_counter()
    await asyncio.gather(*(user(started + seconds, True) for _ in range(users)))
    elapsed = time.perf_counter() - started
    ms = np.asarray(latencies) * 1e3
    return {"requests_per_second": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(latencies), "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kserve-python", required=True, help="a Python with kserve installed (see the docstring)")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--users", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--out", default=f"benchmarks/results/serve_compare_{datetime.date.today()}.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_digits_cnn(os.path.join(tmp, "digits"))
        peer_script = os.path.join(tmp, "kserve_digits.py")
        with open(peer_script, "w") as file:
            file.write(PEER)
        environment = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
        ours_port, peer_port = free_port(), free_port()
        logs = {name: open(os.path.join(tmp, f"{name}.log"), "w") for name in ("lepton_jax", "kserve")}
        servers = {  # both log to files: a pipe nobody reads would stall a server that logs each request
            "lepton_jax": (f"http://127.0.0.1:{ours_port}", subprocess.Popen(
                [sys.executable, "-m", "lepton_jax.cli", "serve", model_dir, "--port", str(ours_port),
                 "--max-batch", "64", "--max-wait-ms", "2"], env=environment, stdout=logs["lepton_jax"],
                stderr=subprocess.STDOUT)),
            "kserve": (f"http://127.0.0.1:{peer_port}", subprocess.Popen(
                [args.kserve_python, peer_script, model_dir, str(peer_port)], env=environment,
                stdout=logs["kserve"], stderr=subprocess.STDOUT)),
        }
        try:
            for name, (url, process) in servers.items():
                _wait_ready(f"{url}/v2/health/ready", process, logs[name].name)
            image = np.random.default_rng(0).uniform(0, 16, (8, 8, 1)).astype(np.float32)
            cases = []
            for protocol, (path, body) in _bodies(image).items():
                for users in args.users:
                    case = {"protocol": protocol, "users": users}
                    for name, (url, _) in servers.items():
                        case[name] = asyncio.run(_load(url, path, body, users, args.seconds))
                        print(protocol, users, name, {k: round(v, 2) for k, v in case[name].items()})
                    case["throughput_ratio"] = (case["lepton_jax"]["requests_per_second"]
                                                / case["kserve"]["requests_per_second"])
                    case["p99_ratio"] = case["lepton_jax"]["p99_ms"] / case["kserve"]["p99_ms"]
                    cases.append(case)
        finally:
            for _, process in servers.values():
                process.terminate()
                process.wait(timeout=60)
            for log in logs.values():
                log.close()
    kserve_version = subprocess.run([args.kserve_python, "-c", "import importlib.metadata as m; "
                                     "print(m.version('kserve'))"], capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "lepton-jax serve vs kserve.ModelServer, digits CNN export, one image per request",
              "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "jax": jax.__version__,
              "kserve": kserve_version, "python": platform.python_version(), "seconds_per_case": args.seconds,
              "cases": cases}
    write_result(result, args.out)


if __name__ == "__main__":
    main()
