"""The one exception hierarchy of coe.

Every error a user can cause or see is a ``CoeError`` subclass defined here. Each carries a
message that names the field, file or value at fault, what was expected, and what to do.
The HTTP mapping (status codes, OpenAI-style bodies) lives in one place,
``coe/server/errors.py``; this module knows nothing about HTTP.
"""

from __future__ import annotations


class CoeError(Exception):
    """Base of every coe error.

    Args:
        message: the human-readable explanation.
        param: the request or config field at fault, when there is one.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(CoeError, ValueError):
    """experts.yaml (or a CLI override) is invalid. Raised at load time, never per request."""


class InvalidRequest(CoeError, ValueError):
    """A request is malformed or asks for something coe cannot do (400)."""


class ContextTooLong(InvalidRequest):
    """Prompt plus max_tokens does not fit the model's context window (400)."""


class UnknownModel(CoeError, LookupError):
    """A request names a model/expert/adapter that does not exist (404)."""


class AdapterError(CoeError):
    """An adapter cannot be loaded or used: missing, corrupt, wrong shapes, rank too high,
    unknown target module, pickle-only. The adapter is named in the message."""

    def __init__(self, adapter: str, message: str, *, param: str | None = None) -> None:
        super().__init__(f"adapter {adapter!r}: {message}", param=param)
        self.adapter = adapter


class AdapterNotFound(AdapterError, LookupError):
    """The adapter's source (dir, file or hub id) does not exist (404 on the admin API)."""


class AdapterPathForbidden(AdapterError, PermissionError):
    """An admin load pointed outside serving.adapter_roots (403 -> reported as 400)."""


class RouterError(CoeError):
    """The router cannot be used: not trained, or trained for a different set of experts."""


class QueueFull(CoeError):
    """The engine's bounded queue is full; retry later (429 with Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineUnavailable(CoeError):
    """The engine is not ready or is shutting down (503)."""


class RequestTimeout(CoeError, TimeoutError):
    """A request ran past its deadline and was cancelled (504)."""


class RequestCancelled(CoeError):
    """A request was cancelled (client disconnect or explicit cancel)."""


class GenerationError(CoeError):
    """Generation of one request failed inside the engine; other requests are unaffected (500)."""


class RemoteBackendError(CoeError):
    """The remote OpenAI-compatible backend failed or could not be reached (502)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AuthError(CoeError, PermissionError):
    """Missing or wrong API key (401)."""
