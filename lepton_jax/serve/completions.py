"""OpenAI-compatible completions (``POST /v1/completions``) over the
continuous batcher, for models exported with a decode step (the GPT).

The request and response follow OpenAI's legacy completions API, so the
official ``openai`` client works unchanged (``base_url=.../v1``): a prompt
as a string (byte-level models) or as token ids, ``max_tokens`` (default
16), ``temperature`` (0-2), ``top_p``, ``stop`` (up to 4 strings, not
included in the text), ``seed``, ``stream`` (server-sent events ending in
``[DONE]``; ``stream_options.include_usage`` adds a usage chunk) and
``usage`` counts. Errors are OpenAI's JSON ``{"error": {"message", "type",
"param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import json
import time
import uuid
from typing import Any, Callable

from starlette.responses import JSONResponse, Response, StreamingResponse

from lepton_jax.sampling import Sampler
from lepton_jax.serve.engine import ContinuousBatcher, Request

DEFAULT_MAX_TOKENS = 16  # OpenAI's default
# Parameters accepted at their default value only (a client may send them).
INERT = {"echo": (False, None), "logprobs": (None,), "best_of": (1, None), "n": (1, None), "suffix": (None, ""),
         "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}),
         "user": None, "stream_options": None}
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", *INERT}


class OpenAIError(Exception):
    """An error answered in OpenAI's format."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return JSONResponse({"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}},
                            status_code=self.status)


@dataclasses.dataclass
class Completion:
    """A checked completion request."""

    model: str
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int
    stream: bool
    include_usage: bool


def _number(payload: dict, name: str, default: float, low: float, high: float, *, open_low: bool = False) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value > high or value < low or \
            (open_low and value == low):
        bound = f"({low}, {high}]" if open_low else f"[{low}, {high}]"
        raise OpenAIError(400, f"{name} must be a number in {bound}, got {value!r}", name)
    return float(value)


def parse(payload: Any, *, vocab_size: int, max_len: int, byte_level: bool) -> Completion:
    """Checks a ``/v1/completions`` body; an ``OpenAIError`` names the bad parameter."""
    if not isinstance(payload, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    unknown = sorted(set(payload) - KNOWN)
    if unknown:
        raise OpenAIError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    for name, allowed in INERT.items():
        if allowed is not None and name in payload and payload[name] not in allowed:
            raise OpenAIError(400, f"{name}={payload[name]!r} is not supported here (only {allowed[0]!r})", name)
    if not isinstance(payload.get("model"), str):
        raise OpenAIError(400, "model is required (a model name from GET /v1/models)", "model")
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not byte_level:
            raise OpenAIError(400, "this model's tokenizer is not served; send the prompt as token ids", "prompt")
        ids = list(prompt.encode("utf-8"))
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        if any(not 0 <= t < vocab_size for t in ids):
            raise OpenAIError(400, f"prompt token ids must be in [0, {vocab_size})", "prompt")
    else:
        raise OpenAIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")
    if not ids:
        raise OpenAIError(400, "prompt is empty; give at least one token", "prompt")
    max_tokens = payload.get("max_tokens")
    max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise OpenAIError(400, f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
    if len(ids) + max_tokens > max_len:
        raise OpenAIError(400, f"this model's context is {max_len} tokens, but the prompt ({len(ids)}) plus "
                               f"max_tokens ({max_tokens}) is {len(ids) + max_tokens}", "max_tokens",
                          "context_length_exceeded")
    stop = payload.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise OpenAIError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OpenAIError(400, f"seed must be an integer, got {seed!r}", "seed")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, f"stream must be a boolean, got {stream!r}", "stream")
    options = payload.get("stream_options") or {}
    return Completion(model=payload["model"], prompt=ids, max_tokens=max_tokens,
                      temperature=_number(payload, "temperature", 1.0, 0.0, 2.0),
                      top_p=_number(payload, "top_p", 1.0, 0.0, 1.0, open_low=True), stop=stop,
                      seed=0 if seed is None else seed, stream=stream,
                      include_usage=bool(isinstance(options, dict) and options.get("include_usage")))


class _Text:
    """Byte tokens to text as they come, holding back what may start a stop string."""

    def __init__(self, stop: list[str]) -> None:
        self.stop, self.text, self.sent = stop, "", 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int) -> None:
        self.text += self._decoder.decode(bytes([token]) if token < 256 else b"")

    def stop_at(self) -> int | None:
        found = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def ready(self, final: bool) -> str:
        """The text that can be sent now (``final``: all of it, an unfinished UTF-8 sequence as U+FFFD)."""
        if final:
            self.text += self._decoder.decode(b"", final=True)
        end = self.stop_at()
        if end is None:
            end = len(self.text)
            if not final:  # keep a tail that is a prefix of a stop string
                for s in self.stop:
                    for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                        if s.startswith(self.text[-k:]):
                            end = min(end, len(self.text) - k)
                            break
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


def _should_stop(stop: list[str]) -> Callable[[list[int]], bool]:
    if not stop:
        return lambda tokens: False
    return lambda tokens: any(s in bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")
                              for s in stop)


async def complete(args: Completion, engine: ContinuousBatcher) -> Response:
    """Runs ``args`` on ``engine``: a JSON completion, or an event stream."""
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    request = Request(prompt=args.prompt, max_tokens=args.max_tokens,
                      sampler=Sampler(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
                      should_stop=_should_stop(args.stop),
                      deliver=lambda item: loop.call_soon_threadsafe(tokens.put_nowait, item))
    try:
        engine.submit(request)
    except ValueError as error:
        raise OpenAIError(400, str(error)) from None
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    text = _Text(args.stop)

    def usage() -> dict[str, int]:
        return {"prompt_tokens": len(args.prompt), "completion_tokens": len(request.generated),
                "total_tokens": len(args.prompt) + len(request.generated)}

    def chunk(piece: str, finish: str | None) -> dict[str, Any]:
        return {"id": ident, "object": "text_completion", "created": created, "model": args.model,
                "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": finish}]}

    if not args.stream:
        try:
            while (token := await tokens.get()) is not None:
                text.add(token)
        finally:
            request.cancel()  # a no-op when it finished; frees the slot when the client went away
        return JSONResponse({**chunk(text.ready(final=True), request.finish_reason), "usage": usage()})

    async def events():
        try:
            while (token := await tokens.get()) is not None:
                text.add(token)
                piece = text.ready(final=False)
                if piece:
                    yield f"data: {json.dumps(chunk(piece, None))}\n\n"
            yield f"data: {json.dumps(chunk(text.ready(final=True), request.finish_reason))}\n\n"
            if args.include_usage:
                yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage()})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            request.cancel()

    return StreamingResponse(events(), media_type="text/event-stream")
