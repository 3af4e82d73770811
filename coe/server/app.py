"""The Litestar app (``create_app``) and the ``coe serve`` command (uvicorn).

``create_app(config, pipeline=None)`` wires the controllers, the key guard, the single
exception handler, metrics and OpenAPI (``/schema``). The lifespan owns the pipeline: it builds
it from the config when none was given (in a worker thread) and shuts it down on exit. The
pipeline is injected into handlers from ``app.state`` (``provide_pipeline``).

``coe serve`` loads and validates everything (router, training it when missing unless
``--no-train``; base model; adapters) BEFORE binding the port, then prints one ready line with
the URL and examples. SIGTERM/SIGINT (``DrainingServer``): the port stays open while new ``/v1``
requests get 503 (and ``/ready`` 503, so a load balancer takes the replica out) and in-flight
generations get ``serving.shutdown_grace_s`` to finish; then the engine stops (a request still
running gets an ``engine_unavailable`` error, never a silently cut stream) and the process exits 0.
A second signal stops at once.

This module knows the pipeline's public API only, never the engine or the routers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterator

import anyio
import uvicorn
from litestar import Litestar, Request, Router
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import SerializationException
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig

from coe import __version__
from coe.config import CoeConfig, load_config
from coe.errors import CoeError, EngineUnavailable, InvalidRequest
from coe.pipeline import Pipeline
from coe.server.auth import ApiKeys, api_key_guard
from coe.server.controllers import AdminController, HealthController, OpenAIController
from coe.server.errors import EXCEPTION_HANDLERS
from coe.server.metrics import Metrics

logger = logging.getLogger("coe.server")


def provide_pipeline(state: State) -> Pipeline:
    """DI provider: the lifespan-owned pipeline (503 until it is ready)."""
    pipeline = state.get("pipeline")
    if pipeline is None or not pipeline.ready:
        raise EngineUnavailable("the server is still loading; retry when GET /ready answers 200")
    return pipeline


def provide_metrics(state: State) -> Metrics:
    return state.metrics


def draining_guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """After SIGTERM, new ``/v1`` requests get a 503 while in-flight ones finish."""
    if connection.app.state.get("draining"):
        raise EngineUnavailable("the server is shutting down; retry on another replica")


class CoeRequest(Request):
    """Litestar's request, with every JSON decoding failure of the body reported as a clear 400.

    msgspec raises ``RecursionError`` on pathological nesting (``[[[[...]]]]``); that is the
    client's fault, but a ``RecursionError`` anywhere else is a bug, so only the decode maps it.
    Its other errors ("Input data was truncated") are reworded to say the body is not JSON,
    except for bytes that are not UTF-8, which re-raise as ``UnicodeDecodeError`` (a 400
    ``invalid_utf8`` naming the byte).
    """

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:
            raise InvalidRequest("the request body is nested too deeply to decode; send a flat OpenAI-style JSON object") from None
        except SerializationException as exc:
            # msgspec 0.23 reports bad UTF-8 as malformed JSON (0.22 raised UnicodeDecodeError):
            # say which, with the byte, whatever the version (errors.py maps it to invalid_utf8).
            (await self.body()).decode("utf-8")
            detail = str(exc.detail or exc).removeprefix("JSON is malformed: ")
            raise InvalidRequest(f"the request body is not valid JSON ({detail}); send one JSON object") from None


@asynccontextmanager
async def _lifespan(app: Litestar) -> AsyncIterator[None]:
    state = app.state
    owned = state.get("pipeline") is None
    if owned:
        state.pipeline = await anyio.to_thread.run_sync(
            lambda: Pipeline.from_config(state.config, train_router_if_missing=state.train_router_if_missing)
        )
    from coe.engine.threads import freeze_heap, unfreeze_heap

    t0 = time.perf_counter()
    frozen = freeze_heap()  # the start-up heap out of the collector's full passes (see freeze_heap)
    logger.info("froze the start-up heap: %d objects, %.0f ms", frozen, (time.perf_counter() - t0) * 1e3)
    try:
        yield
    finally:
        unfreeze_heap()
        state.draining = True
        pipeline: Pipeline | None = state.get("pipeline")
        backend_aclose = getattr(getattr(pipeline, "backend", None), "aclose", None)
        if backend_aclose is not None:
            await backend_aclose()
        if owned and pipeline is not None:
            grace = state.config.serving.shutdown_grace_s
            await anyio.to_thread.run_sync(pipeline.shutdown, grace)


def create_app(
    config: CoeConfig | str | os.PathLike[str],
    pipeline: Pipeline | None = None,
    *,
    train_router_if_missing: bool = False,
    api_keys: ApiKeys | None = None,
) -> Litestar:
    """Build the OpenAI-compatible app.

    Args:
        config: a ``CoeConfig`` or the path of experts.yaml.
        pipeline: a ready pipeline (tests inject one with a fake backend); ``None`` builds it
            from the config in the lifespan (and shuts it down on exit).
        train_router_if_missing: when the lifespan builds the pipeline, train a missing router.
        api_keys: keys to enforce (default: from the config and ``COE_API_KEY``/``COE_ADMIN_KEY``).

    Returns:
        The Litestar app (serve it with uvicorn).
    """
    cfg = config if isinstance(config, CoeConfig) else load_config(config)
    state = State({
        "config": cfg,
        "pipeline": pipeline,
        "train_router_if_missing": train_router_if_missing,
        "api_keys": api_keys if api_keys is not None else ApiKeys.from_config(cfg),
        "draining": False,
        "started_at": time.time(),
    })

    def stats() -> dict[str, Any]:
        p = state.get("pipeline")
        return p.stats() if p is not None else {}

    def adapters() -> list[Any]:
        p = state.get("pipeline")
        return p.backend.list_adapters() if p is not None and p.ready else []

    state.metrics = Metrics(stats=stats, adapters=adapters)
    v1 = Router(path="/v1", route_handlers=[OpenAIController, AdminController], guards=[draining_guard, api_key_guard])
    return Litestar(
        route_handlers=[v1, HealthController],
        dependencies={"pipeline": Provide(provide_pipeline, sync_to_thread=False),
                      "metrics": Provide(provide_metrics, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        request_class=CoeRequest,
        lifespan=[_lifespan],
        state=state,
        request_max_body_size=cfg.serving.max_body_bytes,
        openapi_config=OpenAPIConfig(title="coe", version=__version__, path="/schema",
                                     description="OpenAI-compatible Composition-of-Experts server"),
        debug=False,
    )


# --------------------------------------------------------------------------- coe serve


def ready_message(host: str, port: int, pipeline: Pipeline) -> str:
    """The ready line printed by ``coe serve``, with a curl and an openai-client example."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    base = f"http://{shown}:{port}/v1"
    experts = ", ".join(pipeline.config.expert_names)
    auth = ' -H "Authorization: Bearer $COE_API_KEY"' if ApiKeys.from_config(pipeline.config).enabled else ""
    body = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "What is 17 times 23?"}]})
    return (
        f"coe serve: ready on {base} (experts: {experts}; base model: {pipeline.base_id})\n"
        f"  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n"
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{'$COE_API_KEY' if auth else 'none'}'); "
        f"r = c.chat.completions.create(model='auto', messages=[{{'role': 'user', 'content': 'Extract name and city as JSON: Ana Silva lives in Porto.'}}]); "
        f"print(r.model_extra['coe'], r.choices[0].message.content)\""
    )


def serve_command(args: argparse.Namespace) -> int:
    """``coe serve``: load and validate everything, then serve until SIGTERM/SIGINT.

    Args:
        args: ``config``, ``host``, ``port``, ``no_train``, ``log_level`` (see ``coe serve -h``).

    Returns:
        0 after a clean shutdown. Config problems raise ``ConfigError`` (exit 2), load
        failures ``CoeError`` (exit 1).
    """
    level = getattr(logging, str(args.log_level).upper(), logging.INFO)
    logging.getLogger("coe").setLevel(level)
    cfg = load_config(args.config)
    if getattr(args, "print_vllm_command", False):
        from coe.remote import vllm_command

        print(vllm_command(cfg))
        return 0
    say = lambda msg: print(f"coe serve: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"config {cfg.source_path}: {len(cfg.experts)} experts, router {cfg.router.type}, "
        f"backend {cfg.base_model.backend}")
    t0 = time.perf_counter()
    pipeline = Pipeline.from_config(cfg, train_router_if_missing=not args.no_train)
    say(f"loaded and validated in {time.perf_counter() - t0:.1f} s")
    app = create_app(cfg, pipeline=pipeline)

    server = DrainingServer(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=str(args.log_level).lower(),
                       timeout_graceful_shutdown=int(max(1, cfg.serving.shutdown_grace_s)),
                       access_log=level <= logging.DEBUG),
        app=app, grace_s=cfg.serving.shutdown_grace_s,
        on_ready=lambda port: print(ready_message(args.host, port, pipeline), flush=True),
    )
    try:
        server.run()
    finally:
        pipeline.shutdown(cfg.serving.shutdown_grace_s)
    if not server.started:
        raise CoeError(f"could not start the server on {args.host}:{args.port} (see the log above; is the port in use?)")
    return 0


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain phase on SIGTERM/SIGINT.

    The first signal marks the app as draining: the port stays open, new ``/v1`` requests get a
    503 with ``Retry-After`` (``draining_guard``) and ``/ready`` answers 503, while in-flight
    generations run on. Once none is left, or ``grace_s`` has passed, the server stops; requests
    still running at the deadline are failed by stopping the pipeline first, so their clients get
    an error (status or SSE event) instead of a cut connection. A second signal stops at once.
    uvicorn's own handling would close the listening socket at the first signal, so new requests
    would see "connection refused" instead of a 503, and it re-raises the signal after shutdown,
    killing the process before the engine stops.

    Args:
        config: the uvicorn config (its ``app`` is ``app``).
        app: the Litestar app (its ``state`` has ``draining``, ``metrics`` and ``pipeline``).
        grace_s: seconds in-flight requests get after the first signal.
        on_ready: called with the bound port once the server listens.
    """

    def __init__(self, config: uvicorn.Config, *, app: Litestar, grace_s: float,
                 on_ready: Any = None) -> None:
        super().__init__(config)
        self.app_state = app.state
        self.grace_s = max(0.0, float(grace_s))
        self.on_ready = on_ready
        self.drain_started: float | None = None
        self._engine_stopped: float | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            port = self.config.port
            for server in getattr(self, "servers", []):
                for sock in server.sockets or []:
                    port = sock.getsockname()[1]
                    break
            self.on_ready(port)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.drain_started is None:
            self.drain_started = time.monotonic()
            self.app_state.draining = True
            logger.warning("received %s: draining (new requests get 503; in-flight ones have %g s to finish)",
                           _signal_name(sig), self.grace_s)
            return
        super().handle_exit(sig, frame)

    def in_flight(self) -> int:
        metrics = self.app_state.get("metrics")
        return int(metrics.in_flight) if metrics is not None else 0

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            now = time.monotonic()
            if self.in_flight() <= 0:
                self.should_exit = True
            elif self._engine_stopped is None and now - self.drain_started >= self.grace_s:
                logger.warning("%d request(s) still running after the %g s grace period; stopping them",
                               self.in_flight(), self.grace_s)
                self._engine_stopped = now
                pipeline = self.app_state.get("pipeline")
                if pipeline is not None:
                    await anyio.to_thread.run_sync(pipeline.shutdown, 0.0)
            elif self._engine_stopped is not None and now - self._engine_stopped > 2.0:
                self.should_exit = True  # their error events had time to go out
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals can only be handled on the main thread (tests run servers in threads)
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)
