"""The Litestar app (``create_app``) and the ``coe serve`` command (uvicorn).

``create_app(config, pipeline=None)`` wires the controllers, the key guard, the single
exception handler, metrics and OpenAPI (``/schema``). The lifespan owns the pipeline: it builds
it from the config when none was given (in a worker thread) and shuts it down on exit. The
pipeline is injected into handlers from ``app.state`` (``provide_pipeline``).

``coe serve`` loads and validates everything (router, training it when missing unless
``--no-train``; base model; adapters) BEFORE binding the port, then prints one ready line with
the URL and examples. SIGTERM/SIGINT: new ``/v1`` requests get 503, in-flight requests get
``serving.shutdown_grace_s`` to finish, then the engine stops.

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
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterator

import anyio
from litestar import Litestar, Router
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.di import Provide
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi import OpenAPIConfig

from coe import __version__
from coe.config import CoeConfig, load_config
from coe.errors import CoeError, EngineUnavailable
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


@asynccontextmanager
async def _lifespan(app: Litestar) -> AsyncIterator[None]:
    state = app.state
    owned = state.get("pipeline") is None
    if owned:
        state.pipeline = await anyio.to_thread.run_sync(
            lambda: Pipeline.from_config(state.config, train_router_if_missing=state.train_router_if_missing)
        )
    try:
        yield
    finally:
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
        f"r = c.chat.completions.create(model='auto', messages=[{{'role': 'user', 'content': 'hi'}}]); "
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
    import uvicorn

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

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                port = args.port
                for server in getattr(self, "servers", []):
                    for sock in server.sockets or []:
                        port = sock.getsockname()[1]
                        break
                print(ready_message(args.host, port, pipeline), flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after its graceful shutdown, which would kill the
            # process before the engine is shut down; we shut down and exit 0 instead.
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    server = _Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=str(args.log_level).lower(),
        timeout_graceful_shutdown=int(max(1, cfg.serving.shutdown_grace_s)), access_log=level <= logging.DEBUG,
    ))
    try:
        server.run()
    finally:
        pipeline.shutdown(cfg.serving.shutdown_grace_s)
    if not server.started:
        raise CoeError(f"could not start the server on {args.host}:{args.port} (see the log above; is the port in use?)")
    return 0
