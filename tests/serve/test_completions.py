"""OpenAI-compatible completions with continuous batching, driven by the
official ``openai`` client against the server started for real."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time

import httpx
import jax
import numpy as np
import pytest
from flax import linen

from lepton_jax import models
from lepton_jax.export import export_decoder, export_model
from lepton_jax.serve import create_app
from test_server import _Server  # noqa: E402 (the server fixture helper of the KServe tests)

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a server, exports and many decode steps

MAX_LEN = 48


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """A byte-level GPT exported with its decode step, served with 4 slots."""
    model = models.GPT(models.GPTConfig(vocab_size=256, max_len=MAX_LEN, num_layers=1, num_heads=4, num_kv_heads=2,
                                        d_model=32, d_ff=64, positions="rotary"))
    example = np.zeros((1, MAX_LEN), np.int32)
    params = linen.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(3), example)["params"])
    params = jax.tree.map(lambda p: p * 8.0, params)  # sharper logits: greedy text that varies
    root = tmp_path_factory.mktemp("gpt")
    path = export_model(str(root / "gpt"), lambda v, t: model.apply(v, t), {"params": params}, example,
                        platforms=("cpu",), input_names=("tokens",), output_names=("logits",))
    export_decoder(path, model, {"params": params}, platforms=("cpu",))
    server = _Server(create_app([str(root / "gpt")], slots=4, max_body_bytes=100_000))
    server.model_dir = str(root / "gpt")
    yield server, model, params
    server.stop()


def _alone(model, params, prompt: bytes, n: int) -> bytes:
    """Greedy tokens of the model run by itself (models.generate, its own KV cache)."""
    ids = np.frombuffer(prompt, np.uint8).astype(np.int32)[None]
    return bytes(np.asarray(models.generate(model, params, ids, n, temperature=0.0))[0, len(prompt):].tolist())


def _client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_openai_client_completes_plain_and_streamed(gpt):
    server, model, params = gpt
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["gpt"]
    want = _alone(model, params, b"def ", 12).decode("utf-8", errors="replace")

    plain = client.completions.create(model="gpt", prompt="def ", max_tokens=12, temperature=0)
    assert plain.choices[0].text == want and plain.choices[0].finish_reason == "length"
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (4, 12, 16)
    assert plain.object == "text_completion" and plain.model == "gpt"

    chunks = list(client.completions.create(model="gpt", prompt="def ", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and len(chunks) > 3  # tokens came one by one

    # A stop string ends the text before it, also when streamed (held back until it cannot be a stop).
    stop = want[5:7]
    cut = want[:want.find(stop)]
    stopped = client.completions.create(model="gpt", prompt="def ", max_tokens=12, temperature=0, stop=[stop, "@@"])
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="gpt", prompt="def ", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut

    # Token-id prompts; a seed fixes a sample.
    ids = client.completions.create(model="gpt", prompt=list(b"def "), max_tokens=12, temperature=0)
    assert ids.choices[0].text == want
    sampled = [client.completions.create(model="gpt", prompt="x", max_tokens=8, temperature=1.0, top_p=0.9,
                                         seed=11).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_bad_requests_get_openai_errors(gpt):
    server, _, _ = gpt
    client = _client(server)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="nope", prompt="hi")
    assert unknown.value.code == "model_not_found"
    cases = [({"prompt": ""}, "prompt", "prompt is empty"),
             ({"prompt": "hi", "max_tokens": MAX_LEN}, "max_tokens", "context is 48 tokens"),
             ({"prompt": "hi", "temperature": 3}, "temperature", r"temperature must be a number in \[0.0, 2.0\]"),
             ({"prompt": "hi", "top_p": 0}, "top_p", "top_p must be"),
             ({"prompt": [300]}, "prompt", r"token ids must be in \[0, 256\)"),
             ({"prompt": "hi", "n": 2}, "n", "n=2 is not supported"),
             ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4")]
    for body, param, message in cases:
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model="gpt", **body)
        assert error.value.status_code == 400 and error.value.param == param
        assert re.search(message, error.value.message), error.value.message
    with httpx.Client(base_url=server.url, timeout=30) as raw:
        malformed = raw.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]["message"]
        big = raw.post("/v1/completions", json={"model": "gpt", "prompt": "x" * 200_000})
        assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
        assert raw.post("/v1/completions", json={"model": "gpt", "prompt": "ok", "max_tokens": 2}).status_code == 200


def test_concurrent_requests_share_the_decode_loop_and_match_running_alone(gpt):
    server, model, params = gpt
    client = _client(server)
    prompts = [(f"{'ab' * (i % 5)}def {i}:".encode(), 4 + (7 * i) % 20) for i in range(16)]
    expected = [_alone(model, params, p, n) for p, n in prompts]

    def ask(prompt: bytes, n: int):
        answer = client.completions.create(model="gpt", prompt=list(prompt), max_tokens=n, temperature=0)
        return answer.choices[0].text, time.perf_counter()

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda a: ask(*a), prompts))
    for (text, _), want in zip(answers, expected):
        assert text == want.decode("utf-8", errors="replace")

    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("lepton_generation_running", "lepton_generation_waiting", "lepton_time_to_first_token_seconds_count",
                 "lepton_generated_tokens_total", "lepton_generation_tokens_per_second"):
        assert f'{name}{{model="gpt"}}' in metrics, name


def test_a_short_request_joins_mid_flight_and_leaves_before_a_long_one(gpt):
    """On the engine itself, counted in decode steps (no timing): the short
    request takes the free slot while the long one decodes and finishes first."""
    from lepton_jax.export import loader
    from lepton_jax.sampling import Sampler
    from lepton_jax.serve.engine import ContinuousBatcher, Request

    _, model, params = gpt
    generator = loader.load(gpt[0].model_dir).generator
    with pytest.raises(ValueError, match="slots must be an int >= 1, got 0"):
        ContinuousBatcher(generator, slots=0)
    engine = ContinuousBatcher(generator, slots=2)
    engine.start()
    try:
        long = engine.submit(Request(prompt=list(b"def "), max_tokens=MAX_LEN - 5, sampler=Sampler(temperature=0)))
        tokens = long.tokens
        next(tokens)  # the long request is decoding
        short = engine.submit(Request(prompt=list(b"x"), max_tokens=2, sampler=Sampler(temperature=0)))
        assert bytes(short.tokens) == _alone(model, params, b"x", 2)
        assert bytes([long.generated[0], *tokens]) == _alone(model, params, b"def ", MAX_LEN - 5)
    finally:
        engine.stop()
    assert long.admitted_step < short.admitted_step < short.finished_step < long.finished_step
    # Its one prompt token gives the first sample, which is fed for the second: 2 steps, no waiting.
    assert short.finished_step - short.admitted_step == 2
    assert (long.finish_reason, short.finish_reason) == ("length", "length")


def test_streams_that_disconnect_free_their_slots(gpt):
    server, model, params = gpt

    async def leave_midway(client: httpx.AsyncClient) -> None:
        body = {"model": "gpt", "prompt": "def ", "max_tokens": 40, "temperature": 0, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # one event, then the client goes away

    async def crowd() -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
            await asyncio.wait_for(asyncio.gather(*(leave_midway(client) for _ in range(100))), 120)

    asyncio.run(crowd())
    deadline = time.monotonic() + 30
    while True:
        metrics = httpx.get(f"{server.url}/metrics").text
        busy = re.search(r'lepton_generation_running\{model="gpt"\} (\S+)', metrics).group(1)
        queued = re.search(r'lepton_generation_waiting\{model="gpt"\} (\S+)', metrics).group(1)
        if float(busy) == 0 and float(queued) == 0:
            break
        assert time.monotonic() < deadline, f"slots still held: running {busy}, waiting {queued}"
        time.sleep(0.2)
    answer = _client(server).completions.create(model="gpt", prompt="def ", max_tokens=6, temperature=0)
    assert answer.choices[0].text == _alone(model, params, b"def ", 6).decode("utf-8", errors="replace")
