"""Continuous batching for generation: many requests share one decode loop.

A fixed number of KV-cache *slots* (the batch rows of one cache) run in a
single decode step per iteration. Every active slot consumes one token per
step: its next prompt token while it prefills, then the token it sampled.
A new request takes a free slot at the next step (its row's position is
reset to 0, so the keys left by the slot's last request are masked), and a
finished or cancelled request frees its slot at once, so short requests
never wait for long ones. Rows never attend to each other, so a request's
greedy tokens are the ones it gets alone.

The loop runs in one thread; requests are queued from any thread (or the
asyncio loop) and their tokens are handed back through ``Request.tokens``.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lepton_jax.export.loader import Generator
from lepton_jax.sampling import Sampler

_DONE = object()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request: ``prompt`` token ids, at most ``max_tokens``
    sampled after it; ``should_stop(tokens)`` ends it early (stop strings).
    ``tokens`` yields each sampled id, then ``None`` when it is over;
    ``finish_reason`` is then ``"length"``, ``"stop"`` or ``"cancelled"``.
    ``admitted_step``/``finished_step``: the batcher's step count when the
    request took its slot and when it left it."""

    prompt: Sequence[int]
    max_tokens: int
    sampler: Sampler
    should_stop: Callable[[list[int]], bool] = lambda tokens: False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finish_reason: str | None = None
    admitted_step: int | None = None
    finished_step: int | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    deliver: Callable[[Any], None] | None = None  # called with each token, then None; default: the tokens queue

    def __post_init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._fed = 0  # prompt tokens fed so far

    def cancel(self) -> None:
        """Frees the request's slot at the next step (e.g. the client went away)."""
        self.cancelled.set()

    def _emit(self, item: Any) -> None:
        if self.deliver is not None:
            self.deliver(item)
        else:
            self._queue.put(item)

    @property
    def tokens(self):
        """The sampled token ids as they come (blocking), for callers outside asyncio."""
        while (token := self._queue.get()) is not None:
            yield token


class ContinuousBatcher:
    """Runs ``generator``'s exported decode step over ``slots`` rows at once.

    ``on_step(running, waiting, new_tokens)`` is called after every step (metrics).
    """

    def __init__(self, generator: Generator, *, slots: int = 8,
                 on_step: Callable[[int, int, int], None] | None = None,
                 on_first_token: Callable[[float], None] | None = None) -> None:
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"ContinuousBatcher: slots must be an int >= 1, got {slots!r}")
        self.generator, self.slots = generator, slots
        self.on_step, self.on_first_token = on_step, on_first_token
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._active: list[Request | None] = [None] * slots
        self._wake = threading.Event()
        self._stopping = False
        self.steps = 0  # decode steps run so far
        self._thread: threading.Thread | None = None
        self._index_leaf = next(i for i, leaf in enumerate(generator.spec["cache"]) if leaf["path"].endswith("index"))
        self._cache = generator.empty_cache(slots)

    # -- the caller's side ------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queues ``request`` (checked by the generator first: a ``ValueError`` names the bad argument)."""
        self.generator.check(list(request.prompt), request.max_tokens, request.sampler.temperature,
                             request.sampler.top_k, request.sampler.top_p)
        if self._stopping:
            raise RuntimeError("ContinuousBatcher: stopped")
        self._waiting.put(request)
        self._wake.set()
        return request

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._active)

    @property
    def waiting(self) -> int:
        return self._waiting.qsize()

    def warm_up(self) -> None:
        """Compiles the decode step for the slots (and the sampler) before the first request."""
        logits, _ = self.generator.step(np.zeros((self.slots, 1), np.int32), self._cache)
        Sampler(temperature=0.0)(np.asarray(logits)[:1])
        Sampler(temperature=1.0)(np.asarray(logits)[:1])

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lepton-continuous-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finishes the requests in flight and the queued ones, then ends the loop."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- the loop ---------------------------------------------------------------

    def _admit(self) -> np.ndarray:
        """Fills free slots from the queue; returns the rows whose position restarts at 0."""
        restart = np.zeros(self.slots, bool)
        for slot in range(self.slots):
            if self._active[slot] is None:
                restart[slot] = True  # idle rows stay at position 0
                try:
                    request = self._waiting.get_nowait()
                except queue.Empty:
                    continue
                if request.cancelled.is_set():
                    self._finish(request, "cancelled")
                    continue
                request.admitted_step = self.steps
                self._active[slot] = request
        return restart

    def _finish(self, request: Request, reason: str) -> None:
        request.finish_reason, request.finished_step = reason, self.steps
        request._emit(None)

    def _loop(self) -> None:
        reset = jax.jit(lambda index_B, restart_B: jnp.where(restart_B, 0, index_B))
        while True:
            restart = self._admit()
            if not any(r is not None for r in self._active):
                if self._stopping and self._waiting.empty():
                    return
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._cache[self._index_leaf] = reset(self._cache[self._index_leaf], restart)
            tokens = np.zeros((self.slots, 1), np.int32)
            for slot, request in enumerate(self._active):
                if request is not None:
                    prompt = request.prompt
                    tokens[slot, 0] = prompt[request._fed] if request._fed < len(prompt) else request.generated[-1]
            logits, self._cache = self.generator.step(tokens, self._cache)
            logits = np.asarray(logits)
            self.steps += 1
            new_tokens = 0
            for slot, request in enumerate(self._active):
                if request is None:
                    continue
                if request.cancelled.is_set():
                    self._active[slot] = None
                    self._finish(request, "cancelled")
                    continue
                if request._fed < len(request.prompt):
                    request._fed += 1
                    if request._fed < len(request.prompt):
                        continue  # still prefilling
                token = int(request.sampler(logits[slot:slot + 1])[0])
                request.generated.append(token)
                new_tokens += 1
                if request.first_token_at is None:
                    request.first_token_at = time.perf_counter()
                    if self.on_first_token is not None:
                        self.on_first_token(request.first_token_at - request.submitted)
                request._emit(token)
                if request.should_stop(request.generated):
                    self._active[slot] = None
                    self._finish(request, "stop")
                elif len(request.generated) >= request.max_tokens:
                    self._active[slot] = None
                    self._finish(request, "length")
            if self.on_step is not None:
                self.on_step(self.running, self.waiting, new_tokens)
