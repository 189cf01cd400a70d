"""The Open Inference Protocol (KServe v2 REST) driven by Triton's own
``tritonclient.http``, against ``export.load`` on the same inputs."""

from __future__ import annotations

import json
import re

import httpx
import numpy as np
import pytest

from lepton_jax.export import loader
from lepton_jax.serve import create_app
from test_server import _export_models, _Server  # noqa: E402 (helpers of the KServe v1 tests)

httpclient = pytest.importorskip("tritonclient.http")
pytestmark = pytest.mark.slow  # a server started for real


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir, _, tokens_dir, _ = _export_models(tmp_path_factory.mktemp("v2"))
    server = _Server(create_app([model_dir, tokens_dir], max_batch=8, max_wait_ms=5, max_body_bytes=100_000))
    yield server, model_dir, tokens_dir
    server.stop()


def _client(server):
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60)


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infers_what_export_load_computes(served, binary):
    server, model_dir, tokens_dir = served
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    metadata = client.get_model_metadata("digits")
    assert metadata["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 8, 8, 1]}]
    assert metadata["outputs"][0]["name"] == "logits" and metadata["versions"] == ["1", "2"]

    images = np.random.default_rng(0).uniform(0, 16, (5, 8, 8, 1)).astype(np.float32)
    inputs = [httpclient.InferInput("inputs", list(images.shape), "FP32")]
    inputs[0].set_data_from_numpy(images, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    for version in ("", "1"):
        result = client.infer("digits", inputs, outputs=outputs, model_version=version)
        want = loader.load(model_dir, int(version) if version else None)(images)  # raw inputs, preprocessing inside
        np.testing.assert_allclose(result.as_numpy("logits"), np.asarray(want), rtol=1e-6)

    tokens = np.array([[1, 2, 3], [4, 5, 19]], np.int32)
    token_input = httpclient.InferInput("inputs", [2, 3], "INT32")
    token_input.set_data_from_numpy(tokens, binary_data=binary)
    result = client.infer("tokens", [token_input])
    np.testing.assert_allclose(result.as_numpy("outputs"), np.asarray(loader.load(tokens_dir)(tokens)))


def _binary_request(array: np.ndarray, *, claimed: int | None = None, extra: bytes = b"", **overrides):
    header = {"inputs": [{"name": "inputs", "shape": list(array.shape), "datatype": "FP32",
                          "parameters": {"binary_data_size": claimed if claimed is not None else array.nbytes}}]}
    header["inputs"][0].update(overrides)
    head = json.dumps(header).encode()
    return head + array.tobytes() + extra, {"Inference-Header-Content-Length": str(len(head))}


def test_bad_inference_requests_get_a_4xx_and_the_server_keeps_serving(served):
    server, _, _ = served
    image = np.ones((1, 8, 8, 1), np.float32)
    good = {"inputs": [{"name": "inputs", "shape": [1, 8, 8, 1], "datatype": "FP32", "data": image.ravel().tolist()}]}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        infer = "/v2/models/digits/infer"
        cases = [
            ({"content": b"{oops"}, "malformed JSON"),
            ({"json": {"inputs": [{**good["inputs"][0], "datatype": "FP64"}]}}, "datatype 'FP64', but the model takes FP32"),
            ({"json": {"inputs": [{**good["inputs"][0], "shape": [1, 8, 8]}]}}, r"shape \[1, 8, 8\], but the model takes"),
            ({"json": {"inputs": [{**good["inputs"][0], "data": [1.0] * 10}]}}, r"10 values for shape"),
            ({"json": {"inputs": []}}, r"missing input\(s\) \['inputs'\]"),
            ({"json": {"inputs": [{**good["inputs"][0], "name": "pixels"}]}}, "unknown input 'pixels'"),
            ({"json": {**good, "outputs": [{"name": "probabilities"}]}}, r"unknown output\(s\) \['probabilities'\]"),
        ]
        body, headers = _binary_request(image, claimed=255)
        cases.append(({"content": body, "headers": headers}, r"binary_data_size 255, but shape \[1, 8, 8, 1\] of FP32 is "
                                                             "256 bytes"))
        body, headers = _binary_request(image)
        cases.append(({"content": body[:-10], "headers": headers}, "the binary data holds 246 more bytes, but "
                                                                   "binary_data_size says 256"))
        cases.append(({"content": body + b"extra", "headers": headers}, "5 binary bytes that no input claims"))
        nan_body, nan_headers = _binary_request(np.full((1, 8, 8, 1), np.nan, np.float32))
        cases.append(({"content": nan_body, "headers": nan_headers}, "values must be finite"))
        for kwargs, message in cases:
            response = client.post(infer, **kwargs)
            assert response.status_code == 400, (message, response.text)
            assert re.search(message, response.json()["error"]), (message, response.json())
        assert client.post(infer, content=b"x" * 200_000).status_code == 413
        assert client.get("/v2/models/nope").status_code == 404
        assert client.get("/v2/models/digits/versions/7/ready").status_code == 404
        ok = client.post(infer, content=body, headers=headers)  # the binary form of a good request
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/json"
        np.testing.assert_allclose(ok.json()["outputs"][0]["data"], client.post(infer, json=good).json()["outputs"][0]["data"])
