"""The server started for real (uvicorn on 127.0.0.1) and driven over HTTP:
predictions against numpy, concurrent clients batched together, every bad
input answered with a 4xx while the next good request still succeeds,
versions side by side, metrics, and a graceful shutdown that answers the
requests in flight."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn

from lepton_jax.export import export_model
from lepton_jax.serve import bucket_sizes, create_app

MEAN, STD = 2.0, 4.0


def _linear(params, x):
    return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def _export_models(root) -> tuple[str, dict[int, dict[str, np.ndarray]]]:
    model_dir = str(root / "digits")
    params = {}
    for version in (1, 2):
        rng = np.random.default_rng(version)
        params[version] = {"w": rng.normal(size=(64, 10)).astype(np.float32),
                           "b": rng.normal(size=(10,)).astype(np.float32)}
        export_model(model_dir, _linear, params[version], np.zeros((1, 8, 8, 1), np.float32), platforms=("cpu",),
                     preprocessing={"normalize": {"mean": MEAN, "std": STD}}, output_names=("logits",))
    tokens_dir = str(root / "tokens")
    table = np.arange(40, dtype=np.float32).reshape(20, 2)
    export_model(tokens_dir, lambda p, t: jnp.take(p["table"], t, axis=0).sum(1), {"table": table},
                 np.zeros((1, 3), np.int32), platforms=("cpu",))
    return model_dir, params, tokens_dir, table


def _reference(params, images):
    x = (np.asarray(images, np.float32) - MEAN) / STD
    return x.reshape(len(x), -1) @ params["w"] + params["b"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                   timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir, params, tokens_dir, table = _export_models(tmp_path_factory.mktemp("models"))
    server = _Server(create_app([model_dir, tokens_dir], max_batch=8, max_wait_ms=30, max_body_bytes=200_000))
    yield server, params, table
    server.stop()


def test_predictions_match_the_model_for_each_version(served):
    server, params, table = served
    images = np.random.default_rng(0).uniform(0, 16, (5, 8, 8, 1))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        latest = client.post("/v1/models/digits:predict", json={"instances": images.tolist()})
        first = client.post("/v1/models/digits/versions/1:predict", json={"instances": images.tolist()})
        tokens = client.post("/v1/models/tokens:predict", json={"instances": [[1, 2, 3], [0, 0, 19]]})
        status = client.get("/v1/models/digits").json()
        health = client.get("/healthz").json()
    assert latest.status_code == first.status_code == tokens.status_code == 200
    np.testing.assert_allclose(latest.json()["predictions"], _reference(params[2], images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first.json()["predictions"], _reference(params[1], images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tokens.json()["predictions"], [table[[1, 2, 3]].sum(0), table[[0, 0, 19]].sum(0)])
    assert [s["version"] for s in status["model_version_status"]] == ["1", "2"] and status["default_version"] == 2
    assert status["signature"]["inputs"][0]["shape"] == ["b", 8, 8, 1]
    assert health == {"status": "ok", "models": {"digits": [1, 2], "tokens": [1]}}


def test_concurrent_clients_are_batched(served):
    server, params, _ = served
    rng = np.random.default_rng(1)
    requests = [rng.uniform(0, 16, (int(rng.integers(1, 4)), 8, 8, 1)) for _ in range(24)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*[client.post("/v1/models/digits:predict", json={"instances": r.tolist()})
                                          for r in requests])

    responses = asyncio.run(run())
    for images, response in zip(requests, responses):
        assert response.status_code == 200
        np.testing.assert_allclose(response.json()["predictions"], _reference(params[2], images), rtol=1e-5,
                                   atol=1e-5)
    metrics = httpx.get(f"{server.url}/metrics").text
    calls = float(re.search(r'lepton_batch_size_count\{model="digits"\} (\S+)', metrics).group(1))
    rows = float(re.search(r'lepton_batch_size_sum\{model="digits"\} (\S+)', metrics).group(1))
    assert rows / calls > 1.5  # requests shared model calls
    assert 'lepton_requests_total{code="200",model="digits"}' in metrics
    assert "lepton_request_latency_seconds_bucket" in metrics


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b'{"inputs": []}', 400, '"instances": \\[...\\]'),
    (b'{"instances": []}', 400, "non-empty list"),
    (b'{"instances": [[1, 2, 3]]}', 400, r"input 'inputs' expected rank 4 float32\[b, 8, 8, 1\], got"),
    (b'{"instances": [[[[1.0]]]]}', 400, r"expected shape float32\[b, 8, 8, 1\], got float64\[1, 1, 1, 1\]"),
    (b'{"instances": [[[["a"]]]]}', 400, "must be numbers"),
    (b'{"instances": [[[1], [2, 3]]]}', 400, "ragged"),
    (b'{"instances": [' + b",".join([b"[" + b",".join([b"[" + b",".join([b"[NaN]"] * 8) + b"]"] * 8) + b"]"]) + b"]}",
     400, "malformed JSON body"),  # NaN is not JSON: the parser (orjson) refuses it
    (b'{"instances": [' + b"0," * 120_000 + b"0]}", 413, "over the limit of 200,000"),
])
def test_bad_input_gets_a_clear_4xx_and_the_server_lives_on(served, body, status, message):
    server, params, _ = served
    with httpx.Client(base_url=server.url, timeout=30) as client:
        response = client.post("/v1/models/digits:predict", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status
        assert re.search(message, response.json()["error"]), response.json()
        good = client.post("/v1/models/digits:predict", json={"instances": np.ones((1, 8, 8, 1)).tolist()})
        assert good.status_code == 200


def test_unknown_models_versions_and_oversized_requests(served):
    server, _, _ = served
    with httpx.Client(base_url=server.url, timeout=30) as client:
        unknown = client.post("/v1/models/nope:predict", json={"instances": [1]})
        assert unknown.status_code == 404 and "unknown model 'nope'" in unknown.json()["error"]
        version = client.post("/v1/models/digits/versions/7:predict", json={"instances": [1]})
        assert version.status_code == 404 and "versions are [1, 2]" in version.json()["error"]
        floats = client.post("/v1/models/tokens:predict", json={"instances": [[0.5, 1.0, 2.0]]})
        assert floats.status_code == 400 and "expected dtype int32" in floats.json()["error"]
        big = client.post("/v1/models/digits:predict", json={"instances": np.zeros((9, 8, 8, 1)).tolist()})
        assert big.status_code == 400 and "at most 8 instances per request" in big.json()["error"]
        metrics = client.get("/metrics").text
    assert 'lepton_requests_total{code="404",model="nope"}' in metrics


def test_graceful_shutdown_answers_requests_in_flight(tmp_path):
    model_dir, params, _, _ = _export_models(tmp_path)
    server = _Server(create_app([model_dir], max_batch=4, max_wait_ms=300))
    images = np.random.default_rng(2).uniform(0, 16, (6, 2, 8, 8, 1))
    results = []

    def client(i):
        results.append((i, httpx.post(f"{server.url}/v1/models/digits:predict",
                                      json={"instances": images[i].tolist()}, timeout=30)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.server.server_state.total_requests < 6:  # all six have reached the server
        assert time.monotonic() < deadline, "the requests did not reach the server"
        time.sleep(0.01)
    server.stop()  # the last ones are still waiting for their batch to fill (300 ms)
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 6
    for i, response in results:
        assert response.status_code == 200
        np.testing.assert_allclose(response.json()["predictions"], _reference(params[2], images[i]), rtol=1e-5,
                                   atol=1e-5)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(48) == [1, 2, 4, 8, 16, 32, 48]


@pytest.mark.slow
def test_command_line_serves_and_stops_on_sigterm(tmp_path, subprocess_env):
    import signal
    import subprocess
    import sys

    model_dir, params, _, _ = _export_models(tmp_path)
    port = _free_port()
    env = subprocess_env
    process = subprocess.Popen([sys.executable, "-m", "lepton_jax.cli", "serve", model_dir, "--port", str(port),
                                "--max-batch", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        images = np.full((2, 8, 8, 1), 3.0)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/models/digits:predict",
                              json={"instances": images.tolist()}, timeout=30)
        np.testing.assert_allclose(response.json()["predictions"], _reference(params[2], images), rtol=1e-5,
                                   atol=1e-5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


def _gpt_export(root):
    import jax
    from flax import linen

    from lepton_jax import models
    from lepton_jax.export import export_decoder

    model = models.GPT(models.GPTConfig(vocab_size=256, max_len=32, num_layers=1, num_heads=4, num_kv_heads=2,
                                        d_model=32, d_ff=64, positions="rotary"))
    example = np.zeros((1, 32), np.int32)
    params = linen.meta.unbox(model.init(jax.random.PRNGKey(3), example)["params"])
    params = jax.tree.map(lambda p: p * 8.0, params)  # sharper logits: greedy text that varies
    variables = {"params": params}
    path = export_model(str(root / "gpt"), lambda v, t: model.apply(v, t), variables, example, platforms=("cpu",),
                        input_names=("tokens",), output_names=("logits",))
    export_decoder(path, model, variables, platforms=("cpu",))
    return str(root / "gpt"), model, params


def _events(response) -> list:
    import json

    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[6:] if line[6:] == "[DONE]" else json.loads(line[6:]))
    return events


@pytest.mark.slow
def test_generate_streams_the_kv_cache_decoding(tmp_path):
    from lepton_jax import models

    gpt_dir, model, params = _gpt_export(tmp_path)
    model_dir, _, _, _ = _export_models(tmp_path)
    server = _Server(create_app([gpt_dir, model_dir], max_batch=4))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/models/gpt:generate",
                               json={"prompt": "def ", "max_tokens": 12, "temperature": 0}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                events = _events(response)
            assert events[-1] == "[DONE]" and len(events) == 13
            tokens = [e["token"] for e in events[:-1]]
            want = models.generate(model, params, np.frombuffer(b"def ", np.uint8).astype(np.int32)[None], 12,
                                   temperature=0.0)
            assert tokens == np.asarray(want[0, 4:]).tolist()
            assert len(set(tokens)) > 1
            sampled = [client.post("/v1/models/gpt:generate", json={"prompt": "x", "max_tokens": 8,
                                                                    "temperature": 1.0, "top_k": 5, "seed": 7})
                       for _ in range(2)]
            assert sampled[0].text == sampled[1].text  # the seed fixes the sample
            for body, message in [({"max_tokens": 3}, "non-empty \"prompt\""),
                                  ({"prompt": "hello", "max_tokens": 40}, "max_tokens must be an int >= 1 with"),
                                  ({"prompt": "hi", "temperature": -1}, "temperature must be a number >= 0"),
                                  ({"prompt": "hi", "top_p": 0}, "top_p must be in \\(0, 1\\]"),
                                  ({"prompt": "hi", "top_q": 0.9}, "unknown generation fields \\['top_q'\\]")]:
                bad = client.post("/v1/models/gpt:generate", json=body)
                assert bad.status_code == 400 and re.search(message, bad.json()["error"]), bad.json()
            not_gpt = client.post("/v1/models/digits:generate", json={"prompt": "hi"})
            assert not_gpt.status_code == 400 and "has no decode step" in not_gpt.json()["error"]
            tokens_in = np.frombuffer(b"def main", np.uint8).astype(np.int32)
            padded = np.zeros((1, 32), np.int32)
            padded[0, :8] = tokens_in
            logits = client.post("/v1/models/gpt:predict", json={"instances": padded.tolist()}).json()["predictions"]
            np.testing.assert_allclose(np.asarray(logits)[0, :8], np.asarray(model.apply({"params": params}, padded))[0, :8],
                                       rtol=1e-4, atol=1e-4)
    finally:
        server.stop()
