"""What every route shares: the client-error exception and a body read
under a size limit."""

from __future__ import annotations

from starlette.requests import Request


class BadRequest(Exception):
    """A client error: ``status`` and a message naming what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 ``BadRequest`` once it passes ``limit`` bytes
    (declared or streamed: nothing larger is held in memory)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BadRequest(413, f"request body is over the limit of {limit:,} bytes")
    return bytes(body)
