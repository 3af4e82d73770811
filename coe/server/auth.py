"""Optional bearer API keys for ``/v1/*`` and a separate admin key for the adapter admin API.

Keys come from ``serving.api_keys`` / ``serving.admin_key`` in experts.yaml and from the
environment (``COE_API_KEY``, comma-separated for several; ``COE_ADMIN_KEY``). With no key
configured anywhere the server is open (local development). Keys are compared in constant
time: every stored key's SHA-256 digest is compared with ``hmac.compare_digest`` and the loop
never stops early, so neither the length nor the position of a key leaks through timing.

Policy:
- ``/v1/*`` needs an API key when any is configured (the admin key is accepted there too);
- admin endpoints need the admin key when one is configured; when API keys are configured
  but no admin key, the admin endpoints are closed (a plain user must not load adapters);
- ``/health``, ``/ready`` and ``/metrics`` are open (probes and scrapers).

Knows nothing about the pipeline; it only reads headers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Mapping, Sequence

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from coe.config import CoeConfig
from coe.errors import AuthError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The configured keys, kept as digests only.

    Args:
        api_keys: keys accepted on ``/v1/*``.
        admin_key: key for the adapter admin endpoints (``None``: see the module policy).
    """

    def __init__(self, api_keys: Sequence[str] = (), admin_key: str | None = None) -> None:
        self._api = [_digest(k) for k in api_keys if k]
        self._admin = _digest(admin_key) if admin_key else None

    @classmethod
    def from_config(cls, cfg: CoeConfig, environ: Mapping[str, str] | None = None) -> "ApiKeys":
        """Keys from ``serving`` plus ``COE_API_KEY`` / ``COE_ADMIN_KEY``."""
        env = os.environ if environ is None else environ
        keys = list(cfg.serving.api_keys)
        keys += [k.strip() for k in env.get("COE_API_KEY", "").split(",") if k.strip()]
        admin = cfg.serving.admin_key or env.get("COE_ADMIN_KEY") or None
        return cls(keys, admin)

    @property
    def enabled(self) -> bool:
        return bool(self._api) or self._admin is not None

    def check(self, authorization: str | None, *, admin: bool) -> None:
        """Raise ``AuthError`` unless the ``Authorization`` header carries an accepted key.

        Args:
            authorization: the raw header value (``Bearer <key>``), or ``None``.
            admin: whether the endpoint is an admin endpoint.
        """
        if admin:
            if self._admin is None:
                if not self._api:
                    return
                raise AuthError(
                    "the adapter admin endpoints need the admin key, and none is configured; "
                    "set serving.admin_key or COE_ADMIN_KEY"
                )
            allowed = [self._admin]
        else:
            if not self._api:
                return
            allowed = self._api + ([self._admin] if self._admin is not None else [])
        token = _bearer(authorization)
        if token is None:
            raise AuthError(
                "missing API key; send `Authorization: Bearer <key>` "
                + ("with the admin key" if admin else "(openai client: api_key=...)")
            )
        presented = _digest(token)
        ok = False
        for d in allowed:  # no early exit: constant time over the key list
            ok |= hmac.compare_digest(d, presented)
        if not ok:
            raise AuthError("invalid " + ("admin key" if admin else "API key"))


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def api_key_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Litestar guard: checks the key; admin handlers carry ``opt={"admin": True}``."""
    keys: ApiKeys | None = getattr(connection.app.state, "api_keys", None)
    if keys is None or not keys.enabled:
        return
    keys.check(connection.headers.get("authorization"), admin=bool(handler.opt.get("admin")))
