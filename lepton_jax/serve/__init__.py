"""Serving exported models over HTTP (TF-Serving / KServe v1 REST) with
dynamic batching, and OpenAI-compatible completions with continuous batching: ``create_app`` for any ASGI server, ``serve`` to run it on
uvicorn, ``lepton-jax serve MODEL_DIR...`` from the shell."""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Sequence

from lepton_jax.serve.app import DEFAULT_MAX_BODY_BYTES, create_app
from lepton_jax.serve.batcher import DynamicBatcher, bucket_sizes


def serve(model_dirs: Sequence[str | os.PathLike], *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 64,
          max_wait_ms: float = 5.0, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info",
          slots: int = 8) -> None:
    """Loads and warms up the models, then serves them until SIGINT/SIGTERM;
    on shutdown, requests in flight are answered before the process exits."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # Like uvicorn's, without re-raising the signal afterwards: a
            # drained, orderly shutdown exits with status 0.
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    app = create_app(model_dirs, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes,
                     slots=slots)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
    Server(config).run()


__all__ = ["DEFAULT_MAX_BODY_BYTES", "DynamicBatcher", "bucket_sizes", "create_app", "serve"]
