"""Every error the server can return, mapped to an HTTP status and an OpenAI-style body, here only.

The body is OpenAI's: ``{"error": {"message", "type", "param", "code"}}``, so the official
client raises the right exception class (``NotFoundError`` for 404, ``RateLimitError`` for
429, ...). ``error_response`` serves the app-level exception handlers; ``error_payload`` is
the same mapping for errors that happen after a stream has started (sent as one SSE event).

This module knows the exception hierarchy (``coe.errors``) and Litestar's HTTP exceptions; it
knows nothing about the pipeline or the engine.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from coe import errors as E

logger = logging.getLogger("coe.server")

DECISION_KEY = "coe_routed"  # request.state key where handlers keep the RoutedRequest (metric labels)


@dataclass(frozen=True)
class ErrorKind:
    """How one exception class looks over HTTP."""

    status: int
    type: str
    code: str


# The one table. Order matters only in that lookups walk each exception's MRO, so a subclass
# row (ContextTooLong) wins over its base (InvalidRequest).
ERROR_KINDS: dict[type[BaseException], ErrorKind] = {
    E.ContextTooLong: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    E.InvalidRequest: ErrorKind(400, "invalid_request_error", "invalid_request"),
    E.ConfigError: ErrorKind(400, "invalid_request_error", "invalid_config"),
    E.AuthError: ErrorKind(401, "authentication_error", "invalid_api_key"),
    E.UnknownModel: ErrorKind(404, "invalid_request_error", "model_not_found"),
    E.AdapterNotFound: ErrorKind(404, "invalid_request_error", "adapter_not_found"),
    # errors.py: forbidden paths are reported as 400 (the request named a path it may not use).
    E.AdapterPathForbidden: ErrorKind(400, "invalid_request_error", "adapter_path_forbidden"),
    E.AdapterError: ErrorKind(422, "invalid_request_error", "adapter_error"),
    E.QueueFull: ErrorKind(429, "rate_limit_error", "queue_full"),
    E.RequestCancelled: ErrorKind(499, "request_cancelled", "request_cancelled"),
    E.GenerationError: ErrorKind(500, "server_error", "generation_failed"),
    E.RouterError: ErrorKind(503, "server_error", "router_unavailable"),
    E.RemoteBackendError: ErrorKind(502, "server_error", "remote_backend_error"),
    E.EngineUnavailable: ErrorKind(503, "server_error", "engine_unavailable"),
    E.RequestTimeout: ErrorKind(504, "timeout_error", "request_timeout"),
    E.CoeError: ErrorKind(500, "server_error", "internal_error"),
}

_HTTP_TYPES = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limited"),
}


def kind_of(exc: BaseException) -> ErrorKind:
    """The ``ErrorKind`` of a coe error (by MRO), or a 500 for anything unexpected."""
    for cls in type(exc).__mro__:
        kind = ERROR_KINDS.get(cls)
        if kind is not None:
            return kind
    return ErrorKind(500, "server_error", "internal_error")


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception maps to (Litestar HTTP exceptions keep their own)."""
    if isinstance(exc, HTTPException):
        return exc.status_code
    return kind_of(exc).status


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Map any exception to ``(status, {"error": {...}}, headers)``.

    Args:
        exc: the exception, a ``CoeError``, a Litestar ``HTTPException`` or anything else.

    Returns:
        The HTTP status, the OpenAI-style body, and extra headers (``Retry-After``,
        ``WWW-Authenticate``).
    """
    headers: dict[str, str] = {}
    if isinstance(exc, E.CoeError):
        kind = kind_of(exc)
        status, etype, code, message, param = kind.status, kind.type, kind.code, exc.message, exc.param
        if isinstance(exc, E.QueueFull):
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        elif isinstance(exc, E.EngineUnavailable):
            headers["Retry-After"] = "5"
        elif isinstance(exc, E.AuthError):
            headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(exc, HTTPException):
        status = exc.status_code
        etype, code = _HTTP_TYPES.get(status, ("server_error" if status >= 500 else "invalid_request_error", f"http_{status}"))
        message, param = _http_message(exc)
        headers.update({k: v for k, v in (exc.headers or {}).items()})
    elif isinstance(exc, UnicodeDecodeError):
        # Litestar decodes the JSON body before any handler runs; bad bytes are the client's.
        status, etype, code, param = 400, "invalid_request_error", "invalid_utf8", None
        message = f"the request body is not valid UTF-8 (byte {exc.start}); send UTF-8 JSON"
    else:
        status, etype, code, param = 500, "server_error", "internal_error", None
        # Never leak internals (paths, prompts) in the body; the log has the traceback.
        message = f"internal server error ({type(exc).__name__}); see the server log"
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return status, body, headers


def _http_message(exc: HTTPException) -> tuple[str, str | None]:
    """A readable message from Litestar's exceptions, naming the field for validation errors."""
    if exc.status_code == 413:
        return "request body too large; the limit is serving.max_body_bytes", None
    detail = str(exc.detail or "")
    extra = exc.extra
    if isinstance(exc, ValidationException) and isinstance(extra, list) and extra:
        parts, param = [], None
        for item in extra:
            if isinstance(item, dict):
                key = item.get("key")
                msg = str(item.get("message", "")).strip()
                if key == "data":  # Litestar's name for the whole body: name the field instead
                    named = re.search(r"field `([^`]+)`", msg)
                    key = named.group(1) if named else None
                    if msg == "'data'":  # no body at all
                        msg = "it is empty; send a JSON object"
                    elif msg.startswith("Expected `object`"):
                        msg = "it must be a JSON object" + msg.removeprefix("Expected `object`")
                param = param or (str(key) if key else None)
                parts.append(f"{key}: {msg}" if key and key not in msg else msg)
            else:
                parts.append(str(item))
        return f"invalid request body: {'; '.join(p for p in parts if p)}", param
    return detail or f"HTTP {exc.status_code}", None


def error_response(request: Request, exc: Exception) -> Response:
    """The app-level exception handler: one OpenAI-style JSON error for every exception."""
    status, body, headers = error_payload(exc)
    if status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, body["error"]["message"],
                     exc_info=not isinstance(exc, E.CoeError))
    else:
        logger.info("%s %s -> %d %s", request.method, request.url.path, status, body["error"]["code"])
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        routed = request.state.get(DECISION_KEY)
        metrics.observe_error(request.url.path, status, expert=getattr(routed, "model", None),
                              source=getattr(getattr(routed, "decision", None), "source", None))
    return Response(content=body, status_code=status, headers=headers, media_type="application/json")


EXCEPTION_HANDLERS = {Exception: error_response}
