"""HTTP handlers: the OpenAI-compatible API, routing, adapter admin, health and metrics.

Each handler decodes its body into a ``schemas`` type (Litestar validates it), runs the
blocking parts of the pipeline (routing, tokenizing, adapter loads) in a worker thread so the
event loop keeps streaming other requests, and shapes the answer. Errors are raised, never
built here: ``errors.py`` maps them to HTTP in one place. The pipeline arrives by dependency
injection from ``app.state``, where the lifespan put it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, AsyncIterator

import anyio
from msgspec import UNSET
from litestar import Controller, Request, Response, get, post
from litestar.response import Stream

from coe.engine.threads import one_thread
from coe.errors import EngineUnavailable, InvalidRequest
from coe.pipeline import Pipeline, PipelineResult, RoutedRequest, TextDelta
from coe.types import last_user_text
from coe.server import schemas as S
from coe.server.errors import DECISION_KEY, error_payload
from coe.server.metrics import CONTENT_TYPE, Metrics
from coe.server.streaming import DONE, SSE_HEADERS, cancel_on_disconnect, sse_event


def _coe_info(req: RoutedRequest) -> S.CoeInfo:
    d = req.decision
    score = None if d.score is None else round(float(d.score), 6)
    return S.CoeInfo(expert=d.expert, adapter=req.adapter, source=d.source, score=score, reason=d.reason)


def _coe_headers(req: RoutedRequest) -> dict[str, str]:
    # The header always names who answered; for the bare base model that is its served id.
    return {"x-coe-expert": req.model, "x-coe-source": req.decision.source}


def _usage(r: PipelineResult) -> S.Usage:
    return S.Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                   total_tokens=r.prompt_tokens + r.completion_tokens)


class _Generation:
    """One chat or text completion from routing to the last byte, with its metrics."""

    def __init__(self, request: Request, pipeline: Pipeline, metrics: Metrics, endpoint: str, chat: bool) -> None:
        self.request = request
        self.pipeline = pipeline
        self.metrics = metrics
        self.endpoint = endpoint
        self.chat = chat
        self.t0 = time.perf_counter()
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    async def respond(self, body: S.ChatCompletionRequest | S.CompletionRequest) -> Response:
        body.check_supported()
        if self.chat:
            assert isinstance(body, S.ChatCompletionRequest)
            prepare = self.pipeline.prepare_chat
            what: Any = body.to_messages()
        else:
            assert isinstance(body, S.CompletionRequest)
            prepare = self.pipeline.prepare_completion
            what = body.prompt_text()
        req = await anyio.to_thread.run_sync(one_thread(prepare), what, body.model, body.route_metadata(), body.sampling())
        self.request.state[DECISION_KEY] = req
        self.metrics.route_latency.observe(req.route_s)
        self.metrics.started()
        try:
            if body.stream:
                return await self._stream(req, body.include_usage)
            result = await cancel_on_disconnect(self.request, lambda: self._collect(req))
        finally:
            if not body.stream:
                self.metrics.finished()
        self._finish(req, result, 200)
        return Response(content=self._full(req, result), headers=_coe_headers(req))

    async def _collect(self, req: RoutedRequest) -> PipelineResult:
        first = True
        result = None
        async for item in self.pipeline.astream(req):
            if first:
                first = False
                self.metrics.ttft.labels(req.model).observe(time.perf_counter() - self.t0)
            if isinstance(item, PipelineResult):
                result = item
        assert result is not None, "pipeline stream ended without a result"
        return result

    def _finish(self, req: RoutedRequest, result: PipelineResult | None, status: int) -> None:
        self.metrics.observe_request(self.endpoint, req.model, req.decision.source, status)
        self.metrics.duration.labels(self.endpoint).observe(time.perf_counter() - self.t0)
        if result is not None:
            self.metrics.observe_usage(req.model, result.prompt_tokens, result.completion_tokens)

    def _full(self, req: RoutedRequest, r: PipelineResult) -> S.ChatCompletion | S.TextCompletion:
        if self.chat:
            choice = S.ChatChoice(index=0, message=S.AssistantMessage(role="assistant", content=r.text),
                                  finish_reason=r.finish_reason)
            return S.ChatCompletion(id=self.id, created=self.created, model=req.model, choices=[choice],
                                    usage=_usage(r), coe=_coe_info(req))
        return S.TextCompletion(id=self.id, created=self.created, model=req.model,
                                choices=[S.TextChoice(index=0, text=r.text, finish_reason=r.finish_reason)],
                                usage=_usage(r), coe=_coe_info(req))

    # ------------------------------------------------------------------ streaming

    def _chunk(self, req: RoutedRequest, *, text: str | None = None, role: bool = False,
               finish: str | None = None, coe: bool = False) -> bytes:
        if self.chat:
            delta = S.DeltaMessage(role="assistant" if role else UNSET, content=UNSET if text is None else text)
            obj: Any = S.ChatCompletionChunk(
                id=self.id, created=self.created, model=req.model,
                choices=[S.ChunkChoice(index=0, delta=delta, finish_reason=finish)],
                coe=_coe_info(req) if coe else UNSET,
            )
        else:
            obj = S.TextCompletion(
                id=self.id, created=self.created, model=req.model,
                choices=[S.TextChoice(index=0, text=text or "", finish_reason=finish)],
                coe=_coe_info(req) if coe else UNSET,
            )
        return sse_event(obj)

    def _usage_chunk(self, req: RoutedRequest, r: PipelineResult) -> bytes:
        cls = S.ChatCompletionChunk if self.chat else S.TextCompletion
        return sse_event(cls(id=self.id, created=self.created, model=req.model, choices=[], usage=_usage(r)))

    async def _stream(self, req: RoutedRequest, include_usage: bool) -> Response:
        items = self.pipeline.astream(req)
        try:
            # Wait for the first item before answering, so admission errors (queue full,
            # context too long, adapter failures) still get their own HTTP status.
            first = await cancel_on_disconnect(self.request, items.__anext__)
        except BaseException:
            self.metrics.finished()
            await items.aclose()
            raise
        self.metrics.ttft.labels(req.model).observe(time.perf_counter() - self.t0)
        return Stream(self._events(req, items, first, include_usage), media_type="text/event-stream",
                      headers={**SSE_HEADERS, **_coe_headers(req)})

    async def _events(self, req: RoutedRequest, items: AsyncIterator[Any], first: Any, include_usage: bool) -> AsyncIterator[bytes]:
        status, result = 200, None
        last = time.perf_counter()
        try:
            yield self._chunk(req, role=self.chat, text="" if self.chat else None, coe=True)
            item = first
            while True:
                if isinstance(item, PipelineResult):
                    result = item
                    break
                if isinstance(item, TextDelta) and item.text:
                    now = time.perf_counter()
                    self.metrics.itl.observe(now - last)
                    last = now
                    yield self._chunk(req, text=item.text)
                try:
                    item = await items.__anext__()
                except StopAsyncIteration:
                    break
            if result is None:
                raise EngineUnavailable("generation ended without a final result (the engine stopped)")
            yield self._chunk(req, text=None if self.chat else "", finish=result.finish_reason)
            if include_usage:
                yield self._usage_chunk(req, result)
            yield DONE
        except anyio.get_cancelled_exc_class():
            status = 499  # client went away; the engine slot is freed by aclose below
            raise
        except Exception as exc:
            status, body, _ = error_payload(exc)
            yield sse_event(body)
        finally:
            self.metrics.finished()
            with anyio.CancelScope(shield=True):
                await items.aclose()
            self._finish(req, result, status)


class OpenAIController(Controller):
    """``/v1``: chat and text completions, models, and routing without generation."""

    path = ""
    tags = ["openai"]

    @post("/chat/completions", status_code=200)
    async def create_chat_completion(self, request: Request, data: S.ChatCompletionRequest,
                                     pipeline: Pipeline, metrics: Metrics) -> Response:
        """OpenAI chat completion; ``model: auto`` routes. The body carries a ``coe`` block."""
        return await _Generation(request, pipeline, metrics, "/v1/chat/completions", chat=True).respond(data)

    @post("/completions", status_code=200)
    async def create_completion(self, request: Request, data: S.CompletionRequest,
                                pipeline: Pipeline, metrics: Metrics) -> Response:
        """OpenAI text completion of a raw prompt (no chat template), with the same routing."""
        return await _Generation(request, pipeline, metrics, "/v1/completions", chat=False).respond(data)

    @get("/models", sync_to_thread=False)
    def list_models(self, pipeline: Pipeline, metrics: Metrics, request: Request) -> S.ModelList:
        """``auto``, every expert, runtime-loaded adapters, and the base model."""
        created = int(request.app.state.started_at)
        cards = [
            S.ModelCard(id=m["id"], created=created, owned_by="coe", root=m["adapter"] or pipeline.base_id,
                        parent=m["parent"], coe={"kind": m["kind"], "description": m["description"], "adapter": m["adapter"]})
            for m in pipeline.models()
        ]
        metrics.observe_request("/v1/models", None, None, 200)
        return S.ModelList(data=cards)

    @post("/route", status_code=200)
    async def route(self, data: S.RouteRequest, pipeline: Pipeline, metrics: Metrics) -> S.RouteResponse:
        """The routing decision (with per-expert scores) for ``messages`` or ``text``; no generation."""
        if (data.messages is None) == (data.text is None):
            raise InvalidRequest("give exactly one of `messages` or `text`", param="messages")
        messages = [m.to_message() for m in data.messages] if data.messages is not None else None
        text = data.text if data.text is not None else last_user_text(messages or [])

        def decide() -> tuple[Any, dict[str, float], float]:
            t0 = time.perf_counter()
            decision = pipeline.route(messages, text=text, metadata=data.metadata, model=data.model)
            elapsed = time.perf_counter() - t0
            scores = dict(decision.scores) or (pipeline.scores(text) if data.model == "auto" else {})
            return decision, scores, elapsed

        decision, scores, elapsed = await anyio.to_thread.run_sync(one_thread(decide))
        metrics.route_latency.observe(elapsed)
        metrics.observe_request("/v1/route", decision.expert, decision.source, 200)
        return S.RouteResponse(
            expert=decision.expert, adapter=pipeline.adapter_for(decision), model=decision.expert or pipeline.base_id,
            source=decision.source, score=None if decision.score is None else round(float(decision.score), 6),
            reason=decision.reason, scores={k: round(float(v), 6) for k, v in scores.items()},
            rule=decision.rule, latency_ms=round(elapsed * 1000, 3),
        )


class AdminController(Controller):
    """Adapter admin (vLLM's endpoint names); gated by the admin key."""

    path = ""
    tags = ["admin"]
    opt = {"admin": True}

    @get("/adapters", sync_to_thread=True)
    def list_adapters(self, pipeline: Pipeline) -> S.AdapterList:
        """Every adapter: where it lives (device/cpu/disk/remote), bytes, pinned, in-flight requests."""
        return S.AdapterList(data=[S.AdapterCard(**row) for row in pipeline.list_adapters()])

    @post("/load_lora_adapter", status_code=200)
    async def load_lora_adapter(self, data: S.LoadLoraRequest, pipeline: Pipeline, metrics: Metrics) -> dict[str, Any]:
        """Load an adapter from under ``serving.adapter_roots``; usable as ``model`` at once."""
        if data.load_inplace:
            raise InvalidRequest("load_inplace is not supported; unload the adapter, then load it again",
                                 param="load_inplace")
        row = await anyio.to_thread.run_sync(pipeline.load_adapter, data.lora_name, data.lora_path)
        metrics.observe_request("/v1/load_lora_adapter", data.lora_name, "admin", 200)
        return {"object": "adapter", "message": f"Success: LoRA adapter {data.lora_name!r} added successfully.", **row}

    @post("/unload_lora_adapter", status_code=200)
    async def unload_lora_adapter(self, data: S.UnloadLoraRequest, pipeline: Pipeline, metrics: Metrics) -> dict[str, Any]:
        """Unload a runtime-loaded adapter; ``model=<name>`` is a 404 afterwards."""
        await anyio.to_thread.run_sync(pipeline.unload_adapter, data.lora_name)
        metrics.observe_request("/v1/unload_lora_adapter", data.lora_name, "admin", 200)
        return {"object": "adapter", "name": data.lora_name,
                "message": f"Success: LoRA adapter {data.lora_name!r} removed successfully."}


class HealthController(Controller):
    """Liveness, readiness and Prometheus metrics (no auth: probes and scrapers)."""

    path = ""
    tags = ["health"]

    @get("/health", sync_to_thread=False)
    def health(self) -> dict[str, str]:
        """200 while the process serves HTTP."""
        return {"status": "ok"}

    @get("/ready", sync_to_thread=False)
    def ready(self, request: Request) -> Response:
        """200 once everything is loaded; 503 while loading or shutting down."""
        state = request.app.state
        pipeline = state.get("pipeline")
        if pipeline is None or not pipeline.ready or state.get("draining"):
            reason = "shutting down" if state.get("draining") else "loading"
            return Response({"status": reason}, status_code=503, headers={"Retry-After": "5"})
        return Response({"status": "ready", "base_model": pipeline.base_id,
                         "experts": list(pipeline.config.expert_names)})

    @get("/metrics", sync_to_thread=True, media_type="text/plain")
    def metrics(self, metrics: Metrics) -> Response:
        """Prometheus text format."""
        return Response(content=metrics.render(), media_type=CONTENT_TYPE)
