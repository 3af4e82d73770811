"""SSE framing and client-disconnect handling for generation requests.

OpenAI's stream format: each event is ``data: <json>\\n\\n`` and the stream ends with
``data: [DONE]\\n\\n``; an error after the stream started is one ``data: {"error": ...}`` event
(the openai client raises it as an ``APIError``).

``cancel_on_disconnect`` runs a non-streaming generation while listening for the client going
away, and cancels the generation (freeing its engine slot) when it does; for streams, Litestar's
``Stream`` response already cancels the body iterator on disconnect. Knows nothing about the
pipeline or about OpenAI's JSON shapes.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, TypeVar

import anyio
import msgspec
from litestar import Request

from coe.errors import RequestCancelled

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}
_encode = msgspec.json.Encoder().encode


def sse_event(obj: Any) -> bytes:
    """One SSE ``data:`` event with ``obj`` as compact JSON."""
    return b"data: " + _encode(obj) + b"\n\n"


async def cancel_on_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    """Await ``work()``; if the client disconnects first, cancel it and raise ``RequestCancelled``.

    The request body has already been read, so the next ASGI message can only be
    ``http.disconnect``. The work runs in the caller's task (inside a task group's cancel
    scope), so engine streams see an ordinary task cancellation.
    """
    disconnected = False
    result: Any = None
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal disconnected
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        try:
            result = await work()
        except Exception as exc:  # re-raised below: anyio would wrap it in an ExceptionGroup
            error = exc
        tg.cancel_scope.cancel()
    if disconnected:
        raise RequestCancelled("the client disconnected; generation was cancelled")
    if error is not None:
        raise error
    return result
