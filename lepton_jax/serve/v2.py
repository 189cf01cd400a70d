"""The Open Inference Protocol (KServe v2 REST), with the binary tensor
data extension, beside KServe v1.

- ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``
- ``GET /v2/models/{name}[/versions/{v}]`` (typed inputs and outputs) and ``.../ready``
- ``POST /v2/models/{name}[/versions/{v}]/infer``: ``{"inputs": [{"name",
  "shape", "datatype", "data"}], "outputs": [...]}``. With the binary
  extension the request's JSON is the first ``Inference-Header-Content-Length``
  bytes of the body and each input with ``parameters.binary_data_size`` reads
  its raw little-endian bytes from what follows, in order; outputs asked for
  with ``parameters.binary_data`` (or all, with the request parameter
  ``binary_data_output``) come back the same way.

Inputs are raw (the model's preprocessing runs in the server, as for v1) and
go through the same dynamic batcher. Triton's ``tritonclient.http`` speaks it.
"""

from __future__ import annotations

import math
from typing import Any, Awaitable, Callable

import jax
import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from lepton_jax.export import loader
from lepton_jax.serve.errors import BadRequest, read_body

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {"BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
             "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
             "FP32": "float32", "FP64": "float64", "BF16": "bfloat16"}
TO_V2 = {numpy: v2 for v2, numpy in DATATYPES.items()}


def datatype(dtype_name: str) -> str:
    """The v2 datatype of a signature dtype name."""
    if dtype_name not in TO_V2:
        raise ValueError(f"v2: the dtype {dtype_name!r} has no Open Inference Protocol datatype")
    return TO_V2[dtype_name]


def metadata(name: str, versions: list[int], model: loader.LoadedModel) -> dict[str, Any]:
    """The v2 model metadata: typed inputs and outputs, the batch axis as -1."""
    def tensors(specs):
        return [{"name": s["name"], "datatype": datatype(s["dtype"]),
                 "shape": [-1 if d == loader.BATCH_SYMBOL else d for d in s["shape"]]} for s in specs]

    return {"name": name, "versions": [str(v) for v in versions], "platform": "jax_export",
            "inputs": tensors(model.signature["inputs"]), "outputs": tensors(model.signature["outputs"])}


def _split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    if header_length is None:
        json_part, binary = body, memoryview(b"")
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise BadRequest(400, f"{HEADER_LENGTH} {header_length!r} must be an integer <= the body's "
                                  f"{len(body)} bytes")
        json_part, binary = body[:int(header_length)], memoryview(body)[int(header_length):]
    try:
        payload = orjson.loads(json_part)
    except orjson.JSONDecodeError as error:
        raise BadRequest(400, f"malformed JSON in the inference request: {error}") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise BadRequest(400, 'the inference request must be a JSON object with an "inputs" list')
    return payload, binary


def parse_inputs(payload: dict, binary: memoryview, model: loader.LoadedModel) -> list[np.ndarray]:
    """The request's tensors in signature order, checked against the signature."""
    specs = {s["name"]: s for s in model.signature["inputs"]}
    given: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in payload["inputs"]:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise BadRequest(400, 'each input must be an object with "name", "shape", "datatype" and "data"')
        name = tensor["name"]
        if name not in specs:
            raise BadRequest(400, f"unknown input {name!r}; the model takes {sorted(specs)}")
        if name in given:
            raise BadRequest(400, f"input {name!r} is given twice")
        spec = specs[name]
        want = datatype(spec["dtype"])
        if tensor.get("datatype") != want:
            raise BadRequest(400, f"input {name!r}: datatype {tensor.get('datatype')!r}, but the model takes {want}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in shape):
            raise BadRequest(400, f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
        if len(shape) != len(spec["shape"]) or shape[1:] != spec["shape"][1:] or (shape and shape[0] < 1):
            raise BadRequest(400, f"input {name!r}: shape {shape}, but the model takes "
                                  f"[batch >= 1, {', '.join(map(str, spec['shape'][1:]))}]")
        dtype = loader.numpy_dtype(spec["dtype"])
        count = math.prod(shape)
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if size != count * dtype.itemsize:
                raise BadRequest(400, f"input {name!r}: binary_data_size {size}, but shape {shape} of {want} is "
                                      f"{count * dtype.itemsize} bytes")
            if offset + size > len(binary):
                raise BadRequest(400, f"input {name!r}: the binary data holds {len(binary) - offset} more bytes, "
                                      f"but binary_data_size says {size}")
            array = np.frombuffer(binary[offset:offset + size], dtype.newbyteorder("<")).astype(dtype)
            offset += size
        else:
            if "data" not in tensor:
                raise BadRequest(400, f"input {name!r} has neither \"data\" nor parameters.binary_data_size")
            try:
                array = np.asarray(tensor["data"], dtype=dtype if dtype.kind != "V" else np.float32)
            except (TypeError, ValueError) as error:
                raise BadRequest(400, f"input {name!r}: data are not {want} numbers ({error})") from None
            if array.size != count:
                raise BadRequest(400, f"input {name!r}: {array.size} values for shape {shape} ({count})")
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):  # binary data can hold NaN
            raise BadRequest(400, f"input {name!r}: values must be finite (got NaN or infinity)")
        given[name] = array.reshape(shape)
    if offset != len(binary):
        raise BadRequest(400, f"the body holds {len(binary) - offset} binary bytes that no input claims")
    missing = sorted(set(specs) - set(given))
    if missing:
        raise BadRequest(400, f"missing input(s) {missing}")
    return [given[s["name"]] for s in model.signature["inputs"]]


def encode_outputs(payload: dict, outputs: Any, name: str, version: int,
                   model: loader.LoadedModel) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, with binary tensors appended when asked."""
    specs = model.signature["outputs"]
    arrays = {s["name"]: np.asarray(leaf) for s, leaf in zip(specs, jax.tree.leaves(outputs))}
    requested = payload.get("outputs")
    all_binary = bool((payload.get("parameters") or {}).get("binary_data_output"))
    if requested is None:
        wanted = {s["name"]: all_binary for s in specs}
    else:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
            raise BadRequest(400, '"outputs" must be a list of {"name": ...} objects')
        unknown = sorted(o["name"] for o in requested if o["name"] not in arrays)
        if unknown:
            raise BadRequest(400, f"unknown output(s) {unknown}; the model gives {sorted(arrays)}")
        wanted = {o["name"]: bool((o.get("parameters") or {}).get("binary_data", all_binary)) for o in requested}
    tensors, chunks = [], []
    for spec in specs:
        if spec["name"] not in wanted:
            continue
        array = arrays[spec["name"]]
        entry = {"name": spec["name"], "datatype": datatype(spec["dtype"]), "shape": list(array.shape)}
        if wanted[spec["name"]]:
            raw = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        tensors.append(entry)
    response = {"model_name": name, "model_version": str(version), "outputs": tensors}
    if "id" in payload:
        response["id"] = payload["id"]
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": "application/json"}
    return header + b"".join(chunks), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def routes(find: Callable[[str, str | None], Any], run: Callable[[Any, list[np.ndarray]], Awaitable[Any]],
           all_models: Callable[[], dict[str, dict[int, Any]]], max_body_bytes: int,
           count: Callable[[str, int], None]) -> list[Route]:
    """The v2 routes. ``find(name, version)`` returns a served model (a
    ``BadRequest`` 404 when unknown); ``run(served, arrays)`` batches a call."""

    def error(exc: BadRequest) -> Response:
        return Response(orjson.dumps({"error": str(exc)}), status_code=exc.status, media_type="application/json")

    def ok(body: Any) -> Response:
        return Response(orjson.dumps(body), media_type="application/json")

    async def server_metadata(request: Request) -> Response:
        from lepton_jax import __version__

        return ok({"name": "lepton_jax", "version": __version__, "extensions": ["binary_tensor_data"]})

    async def live(request: Request) -> Response:
        return ok({"live": True})

    async def ready(request: Request) -> Response:
        return ok({"ready": bool(all_models())})

    async def model_metadata(request: Request) -> Response:
        try:
            served = find(request.path_params["name"], request.path_params.get("version"))
        except BadRequest as exc:
            return error(exc)
        return ok(metadata(served.name, sorted(all_models()[served.name]), served.model))

    async def model_ready(request: Request) -> Response:
        try:
            served = find(request.path_params["name"], request.path_params.get("version"))
        except BadRequest as exc:
            return error(exc)
        return ok({"name": served.name, "ready": True})

    async def infer(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            served = find(name, request.path_params.get("version"))
            body = await read_body(request, max_body_bytes)
            payload, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
            arrays = served.model.prepare(*parse_inputs(payload, binary, served.model))
            outputs = await run(served, arrays)
            content, headers = encode_outputs(payload, outputs, served.name, served.version, served.model)
            response = Response(content, headers=headers)
        except BadRequest as exc:
            response = error(exc)
        except ValueError as exc:  # the signature's and the batcher's checks
            response = error(BadRequest(400, str(exc)))
        count(name, response.status_code)
        return response

    paths = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
    return [Route("/v2", server_metadata), Route("/v2/health/live", live), Route("/v2/health/ready", ready),
            *(Route(p, model_metadata) for p in paths), *(Route(f"{p}/ready", model_ready) for p in paths),
            *(Route(f"{p}/infer", infer, methods=["POST"]) for p in paths)]
