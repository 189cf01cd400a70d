"""An ASGI app (Starlette) serving exported model directories over the
TF-Serving / KServe v1 REST protocol, with dynamic batching.

Routes (``name`` is a model directory's base name):

- ``POST /v1/models/{name}:predict`` (and ``/versions/{v}:predict``):
  ``{"instances": [...]}`` -> ``{"predictions": [...]}``. An instance is one
  example without the batch axis (a nested list), or ``{input_name: value}``
  for models with several inputs. Raw inputs: the model's preprocessing
  (e.g. the training split's normalization) is applied by the server.
- ``POST /v1/models/{name}:generate`` for models exported with a decode step
  (the GPT): ``{"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed"}`` ->
  server-sent events, one ``{"token", "text"}`` per sampled token as soon as it
  is drawn (KV cache), then ``[DONE]``.
- ``GET /v1/models/{name}`` (and ``/versions/{v}``): status, versions, the
  default version and the signature.
- The Open Inference Protocol (KServe v2 REST, binary tensors too) under
  ``/v2`` (``serve.v2``).
- ``POST /v1/completions``, ``GET /v1/models``: OpenAI-compatible
  completions for the models with a decode step (``serve.completions``).
- ``GET /healthz``; ``GET /metrics`` (Prometheus text: requests by model and
  status code, latency histogram, batch sizes; generation: running and
  waiting requests, time to first token, tokens generated and per second).

Generation (``:generate`` and completions) runs on a ``ContinuousBatcher``
per model version: concurrent requests share one decode loop over ``slots``
KV-cache rows, joining and leaving between steps.

Bad input (malformed JSON, no ``instances``, wrong shape or dtype, non-finite
numbers, a body over the size limit, an unknown model or version) gets a 4xx
with ``{"error": "..."}`` naming what was wrong and what was expected; it
never reaches a batch, so it cannot fail a neighbour's request.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import math
import os
import time
from typing import Any, Sequence

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from lepton_jax.export import loader
from lepton_jax.sampling import Sampler
from lepton_jax.serve import v2
from lepton_jax.serve.batcher import DynamicBatcher, bucket_sizes
from lepton_jax.serve.completions import OpenAIError, complete, parse
from lepton_jax.serve.engine import ContinuousBatcher, Request as GenerationRequest
from lepton_jax.serve.errors import BadRequest, read_body

DEFAULT_MAX_BODY_BYTES = 16 << 20


class ServedModel:
    """One loaded version of a model and its batcher."""

    def __init__(self, name: str, model: loader.LoadedModel, *, max_batch: int, max_wait_ms: float,
                 on_batch, slots: int = 8, on_step=None, on_first_token=None) -> None:
        self.name, self.model, self.version = name, model, model.version
        # Generation: every request to this version shares one decode loop.
        self.engine = None if model.generator is None else ContinuousBatcher(
            model.generator, slots=slots, on_step=on_step, on_first_token=on_first_token)
        example = [np.zeros([1, *spec["shape"][1:]], loader.numpy_dtype(spec["dtype"]))
                   for spec in model.signature["inputs"]]
        self.batcher = DynamicBatcher(lambda *x: model(*x, preprocess=False), example, max_batch=max_batch,
                                      max_wait_ms=max_wait_ms, on_batch=on_batch)

    def status(self) -> dict[str, Any]:
        return {"version": str(self.version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}


def create_app(model_dirs: Sequence[str | os.PathLike], *, max_batch: int = 64, max_wait_ms: float = 5.0,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, warm_up: bool = True, slots: int = 8) -> Starlette:
    """The app serving every version in each of ``model_dirs`` (default: the latest).

    Each version is compiled for every bucket size before the app is
    returned (``warm_up``), so no request waits for compilation. Models
    with a decode step generate for up to ``slots`` requests at once
    (continuous batching); more wait for a free slot.
    """
    if not model_dirs:
        raise ValueError("create_app: give at least one model directory")
    registry = CollectorRegistry()
    requests_total = Counter("lepton_requests", "Requests by model and HTTP status", ["model", "code"],
                             registry=registry)
    latency = Histogram("lepton_request_latency_seconds", "Request latency", ["model"], registry=registry,
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
    batch_rows = Histogram("lepton_batch_size", "Rows per model call", ["model"], registry=registry,
                           buckets=[float(b) for b in bucket_sizes(max_batch)])

    running = Gauge("lepton_generation_running", "Generation requests holding a KV-cache slot", ["model"],
                    registry=registry)
    waiting = Gauge("lepton_generation_waiting", "Generation requests waiting for a slot", ["model"], registry=registry)
    first_token = Histogram("lepton_time_to_first_token_seconds", "Time from arrival to the first token", ["model"],
                            registry=registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
    generated = Counter("lepton_generated_tokens", "Tokens generated", ["model"], registry=registry)
    tokens_per_second = Gauge("lepton_generation_tokens_per_second", "Tokens generated per second over the last "
                              "second of decode steps", ["model"], registry=registry)

    def step_metrics(name: str):
        window: list[tuple[float, int]] = []

        def on_step(active: int, queued: int, new_tokens: int) -> None:
            now = time.perf_counter()
            running.labels(model=name).set(active)
            waiting.labels(model=name).set(queued)
            generated.labels(model=name).inc(new_tokens)
            window.append((now, new_tokens))
            while window and window[0][0] < now - 1.0:
                window.pop(0)
            span = max(now - window[0][0], 1e-3) if len(window) > 1 else 1.0
            tokens_per_second.labels(model=name).set(sum(n for _, n in window[1:]) / span if len(window) > 1 else
                                                     new_tokens)

        return on_step

    models: dict[str, dict[int, ServedModel]] = {}
    for model_dir in model_dirs:
        model_dir = os.path.abspath(os.fspath(model_dir))
        name = os.path.basename(model_dir.rstrip(os.sep))
        if name in models:
            raise ValueError(f"create_app: two model directories are named {name!r}")
        versions = loader.list_versions(model_dir)
        if not versions:
            raise FileNotFoundError(f"create_app: {model_dir!r} holds no exported model versions")
        models[name] = {}
        for version in versions:
            served = ServedModel(name, loader.load(model_dir, version), max_batch=max_batch, max_wait_ms=max_wait_ms,
                                 on_batch=lambda rows, n=name: batch_rows.labels(model=n).observe(rows),
                                 slots=slots, on_step=step_metrics(name),
                                 on_first_token=lambda seconds, n=name: first_token.labels(model=n).observe(seconds))
            if warm_up:
                served.batcher.warm_up()
                if served.engine is not None:
                    served.engine.warm_up()
            models[name][version] = served

    def find(name: str, version: str | None) -> ServedModel:
        if name not in models:
            raise BadRequest(404, f"unknown model {name!r}; this server has {sorted(models)}")
        versions = models[name]
        if version is None:
            return versions[max(versions)]
        if not version.isdigit() or int(version) not in versions:
            raise BadRequest(404, f"model {name!r} has no version {version!r}; versions are {sorted(versions)}")
        return versions[int(version)]

    async def predict(request: Request) -> Response:
        name = request.path_params["name"]
        start = time.perf_counter()
        try:
            served = find(name, request.path_params.get("version"))
            arrays = served.model.prepare(*_instances_to_arrays(await _read_json(request, max_body_bytes), served))
            outputs = await served.batcher.submit(arrays)
            response = Response(_predictions_json(outputs, served), media_type="application/json")
        except BadRequest as error:
            response = JSONResponse({"error": str(error)}, status_code=error.status)
        except ValueError as error:  # shape, dtype or size checks of the signature and the batcher
            response = JSONResponse({"error": str(error)}, status_code=400)
        requests_total.labels(model=name, code=str(response.status_code)).inc()
        latency.labels(model=name).observe(time.perf_counter() - start)
        return response

    async def generate(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            served = find(name, request.path_params.get("version"))
            generator = served.model.generator
            if generator is None:
                raise BadRequest(400, f"model {name!r} has no decode step: :generate serves models exported with one "
                                      "(lepton-jax export --recipe gpt)")
            args = _generation_args(await _read_json(request, max_body_bytes))
            prompt = list(args.pop("prompt").encode("utf-8"))
            if args["max_tokens"] is None:  # default: up to 64, within the model's context
                args["max_tokens"] = max(1, min(64, generator.max_len - len(prompt)))
            loop, queued = asyncio.get_running_loop(), asyncio.Queue()
            # The sampler and submit check every argument (a ValueError names the bad one).
            request = served.engine.submit(GenerationRequest(
                prompt=prompt, max_tokens=args["max_tokens"],
                sampler=Sampler(temperature=args["temperature"], top_k=args["top_k"], top_p=args["top_p"],
                                seed=args["seed"]),
                deliver=lambda item: loop.call_soon_threadsafe(queued.put_nowait, item)))
        except BadRequest as error:
            requests_total.labels(model=name, code=str(error.status)).inc()
            return JSONResponse({"error": str(error)}, status_code=error.status)
        except ValueError as error:
            requests_total.labels(model=name, code="400").inc()
            return JSONResponse({"error": str(error)}, status_code=400)
        requests_total.labels(model=name, code="200").inc()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

        async def events():
            try:
                while (token := await queued.get()) is not None:
                    text = decoder.decode(bytes([token]))
                    yield f"data: {json.dumps({'token': token, 'text': text})}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # a client that went away frees its slot
                request.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    def find_generative(name: Any) -> ServedModel:
        if name not in models:
            raise OpenAIError(404, f"The model {name!r} does not exist; this server has {sorted(models)}", "model",
                              "model_not_found")
        served = models[name][max(models[name])]
        if served.engine is None:
            raise OpenAIError(400, f"The model {name!r} has no decode step; completions need a GPT exported with one "
                                   "(lepton-jax export --recipe gpt)", "model")
        return served

    async def completions(request: Request) -> Response:
        name = "?"
        try:
            try:
                payload = await _read_json(request, max_body_bytes)
            except BadRequest as error:
                raise OpenAIError(error.status, str(error)) from None
            name = payload.get("model") if isinstance(payload, dict) and isinstance(payload.get("model"), str) else "?"
            served = find_generative(name)
            generator = served.model.generator
            args = parse(payload, vocab_size=generator.vocab_size, max_len=generator.max_len,
                         byte_level=generator.spec.get("tokenizer", "bytes") == "bytes")
            response = await complete(args, served.engine)
        except OpenAIError as error:
            response = error.response()
        requests_total.labels(model=name, code=str(response.status_code)).inc()
        return response

    async def list_models(request: Request) -> Response:
        data = [{"id": name, "object": "model", "created": int(os.path.getmtime(versions[max(versions)].model.path)),
                 "owned_by": "lepton_jax"} for name, versions in sorted(models.items())
                if versions[max(versions)].engine is not None]
        return JSONResponse({"object": "list", "data": data})

    async def model_status(request: Request) -> Response:
        try:
            served = find(request.path_params["name"], request.path_params.get("version"))
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        versions = models[served.name]
        shown = [served] if "version" in request.path_params else [versions[v] for v in sorted(versions)]
        return JSONResponse({"model_version_status": [s.status() for s in shown], "default_version": max(versions),
                             "signature": served.model.signature, "metadata": served.model.metadata})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": {n: sorted(v) for n, v in models.items()}})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        for versions in models.values():
            for served in versions.values():
                served.batcher.start()
                if served.engine is not None:
                    served.engine.start()
        yield
        for versions in models.values():  # drain: every queued request is answered
            for served in versions.values():
                await served.batcher.stop()
                if served.engine is not None:
                    await asyncio.get_running_loop().run_in_executor(None, served.engine.stop)

    routes = [
        Route("/healthz", health),
        Route("/metrics", metrics),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", list_models),
        Route("/v1/models/{name}:predict", predict, methods=["POST"]),
        Route("/v1/models/{name}/versions/{version}:predict", predict, methods=["POST"]),
        Route("/v1/models/{name}:generate", generate, methods=["POST"]),
        Route("/v1/models/{name}/versions/{version}:generate", generate, methods=["POST"]),
        Route("/v1/models/{name}", model_status),
        Route("/v1/models/{name}/versions/{version}", model_status),
        *v2.routes(find, lambda served, arrays: served.batcher.submit(arrays), lambda: models, max_body_bytes,
                   lambda name, code: requests_total.labels(model=name, code=str(code)).inc()),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.models = models
    return app


async def _read_json(request: Request, limit: int) -> Any:
    body = await read_body(request, limit)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(400, f"malformed JSON body: {error}") from None


def _generation_args(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict) or not isinstance(payload.get("prompt"), str) or not payload["prompt"]:
        raise BadRequest(400, 'the body must be a JSON object with a non-empty "prompt" string (and optionally '
                              '"max_tokens", "temperature", "top_k", "top_p", "seed")')
    unknown = sorted(set(payload) - {"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed"})
    if unknown:
        raise BadRequest(400, f"unknown generation fields {unknown}; known: prompt, max_tokens, temperature, top_k, "
                              "top_p, seed")
    args = {"prompt": payload["prompt"], "max_tokens": payload.get("max_tokens"),
            "temperature": payload.get("temperature", 1.0), "top_k": payload.get("top_k", 0),
            "top_p": payload.get("top_p", 1.0), "seed": payload.get("seed", 0)}
    if not isinstance(args["seed"], int):
        raise BadRequest(400, f"seed must be an int, got {args['seed']!r}")
    return args


def _instances_to_arrays(payload: Any, served: ServedModel) -> list[np.ndarray]:
    specs = served.model.signature["inputs"]
    expected = ", ".join(f"{s['name']}: {s['dtype']}[{', '.join(map(str, s['shape'][1:]))}]" for s in specs)
    if not isinstance(payload, dict) or "instances" not in payload:
        raise BadRequest(400, f'the body must be a JSON object {{"instances": [...]}}; each instance is ({expected})')
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequest(400, f'"instances" must be a non-empty list; each instance is ({expected})')
    if len(specs) == 1:
        columns = {specs[0]["name"]: instances}
    else:
        if not all(isinstance(i, dict) for i in instances):
            raise BadRequest(400, f"this model has {len(specs)} inputs: each instance must be an object "
                                  f"{{{', '.join(repr(s['name']) for s in specs)}}}")
        missing = [s["name"] for s in specs if any(s["name"] not in i for i in instances)]
        if missing:
            raise BadRequest(400, f"instances lack input(s) {missing}; expected ({expected})")
        columns = {s["name"]: [i[s["name"]] for i in instances] for s in specs}
    arrays = []
    for spec in specs:
        try:
            array = np.asarray(columns[spec["name"]])
        except ValueError as error:
            raise BadRequest(400, f"input {spec['name']!r}: instances are ragged or not numbers ({error}); "
                                  f"expected {expected}") from None
        if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise BadRequest(400, f"input {spec['name']!r}: instances must be numbers of shape "
                                  f"{spec['shape'][1:]}, got {array.dtype} values of shape {list(array.shape[1:])}")
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise BadRequest(400, f"input {spec['name']!r}: values must be finite (got NaN or infinity)")
        arrays.append(array)
    return arrays


def _predictions_json(outputs: Any, served: ServedModel) -> bytes:
    """``{"predictions": ...}`` as JSON bytes: orjson writes the arrays
    directly (no Python lists) unless a value is not finite."""
    import jax

    leaves = [np.asarray(x) for x in jax.tree.leaves(outputs)]
    if all(x.dtype.kind != "f" or np.isfinite(x).all() for x in leaves):
        if len(leaves) == 1:
            predictions: Any = leaves[0]
        else:  # one object per row: {output name: that row's values}
            names = [spec["name"] for spec in served.model.signature["outputs"]]
            predictions = [dict(zip(names, rows)) for rows in zip(*leaves)]
        with contextlib.suppress(orjson.JSONEncodeError):  # e.g. bfloat16, which orjson does not write
            return orjson.dumps({"predictions": predictions}, option=orjson.OPT_SERIALIZE_NUMPY)
    return orjson.dumps({"predictions": _outputs_to_predictions(leaves, served)})


def _outputs_to_predictions(leaves: list[np.ndarray], served: ServedModel) -> list[Any]:
    if len(leaves) == 1:
        return [_finite_json(row.tolist()) for row in leaves[0]]
    names = [spec["name"] for spec in served.model.signature["outputs"]]
    return [{name: _finite_json(leaf[i].tolist()) for name, leaf in zip(names, leaves)}
            for i in range(leaves[0].shape[0])]


def _finite_json(value: Any) -> Any:
    # Strict JSON has no NaN/inf: a model that produces them reports strings.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_finite_json(v) for v in value]
    return value
