"""The pipeline: decide which expert answers a request, then run it on that expert's adapter.

One request goes: explicit pick -> pre-router rules -> router (else fallback) -> post-router
rules (all in ``routers.DecisionChain``), then the chosen expert's ``system_prompt`` is
prepended when the conversation has none, its ``generation`` defaults fill what the request
left unset (``serving.max_tokens_default`` when neither sets ``max_tokens``), and the backend
generates with the expert's adapter. Every result carries the ``RouteDecision``.

The backend is coe's in-process engine (``backend: local``) or a remote OpenAI-compatible
multi-LoRA server (``backend: remote``, ``coe/remote.py``); both expose the same subset:
``generate``/``stream``/``astream``, ``list_adapters``, ``load_adapter``/``unload_adapter``,
``stats``, ``shutdown``. Adapters are named after their expert in the backend.

This is the ONLY module that imports both the routers and the engine. It knows nothing
about HTTP: the server (``coe/server``) is a thin layer over it, and the same object works
in-process::

    from coe import Pipeline
    p = Pipeline.from_config("experts.yaml")
    r = p.chat([{"role": "user", "content": "How many users signed up in May?"}], model="auto")
    print(r.decision.expert, r.text)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Mapping, Protocol, Sequence

from coe.config import EXPERT_NAME_RE, RESERVED_MODEL_NAMES, CoeConfig, ExpertConfig, load_config
from coe.errors import (
    AdapterError,
    AdapterNotFound,
    AdapterPathForbidden,
    ContextTooLong,
    GenerationError,
    InvalidRequest,
    RouterError,
    UnknownModel,
)
from coe.types import SAMPLING_EPS, Message, RouteContext, RouteDecision, SamplingParams, content_text

logger = logging.getLogger("coe.pipeline")

AUTO = "auto"
CHAT_ROLES = ("system", "user", "assistant", "tool")
# OpenAI's defaults for what neither the request nor the expert sets.
_OPENAI_DEFAULTS = SamplingParams(temperature=1.0, top_p=1.0, top_k=0)
# Values echoed in error messages are cut to this many characters (a 1 MB model name must not
# come back in the body, or in the log).
_ECHO_CHARS = 80


class Decider(Protocol):
    """What the pipeline needs from ``routers.DecisionChain``."""

    def decide(self, ctx: RouteContext) -> RouteDecision: ...


class Backend(Protocol):
    """The generation backend: ``coe.engine.Engine`` or ``coe.remote.RemoteBackend``."""

    model_id: str

    def generate(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                 adapter: str | None = None, **kw: Any) -> Any: ...

    def stream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
               adapter: str | None = None, **kw: Any) -> Iterator[Any]: ...

    def astream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                adapter: str | None = None, **kw: Any) -> AsyncIterator[Any]: ...

    def list_adapters(self) -> list[Any]: ...

    def load_adapter(self, name: str, source: str) -> Any: ...

    def unload_adapter(self, name: str) -> Any: ...

    def stats(self) -> dict[str, Any]: ...

    def shutdown(self, grace_s: float = 0.0) -> None: ...


@dataclass(frozen=True)
class RoutedRequest:
    """A request after routing, ready for the backend.

    Args:
        decision: the route.
        model: the served name that answers (expert, runtime adapter or base model id).
        adapter: the backend adapter name, ``None`` for the base model.
        messages: the conversation (system prompt applied) for chat requests.
        prompt: the raw prompt for text completions.
        sampling: the merged generation settings.
        route_s: seconds spent deciding.
    """

    decision: RouteDecision
    model: str
    adapter: str | None
    messages: tuple[Message, ...] | None
    prompt: str | None
    sampling: SamplingParams
    route_s: float = 0.0


@dataclass(frozen=True)
class PipelineResult:
    """A finished generation.

    Args:
        text: the generated text.
        decision: which expert answered and why.
        model: the served name that answered.
        adapter: the backend adapter used (``None``: base model).
        finish_reason: ``stop`` (EOS or a stop string) or ``length``.
        prompt_tokens: tokens in the prompt (chat template applied).
        completion_tokens: tokens generated.
        token_ids: the generated token ids (empty for remote backends).
    """

    text: str
    decision: RouteDecision
    model: str
    adapter: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """A streamed piece of text."""

    text: str
    token_ids: tuple[int, ...] = ()


class ChatStream:
    """A synchronous stream: iterate for text pieces; ``result`` is set at the end.

    Args:
        request: the routed request (``request.decision`` is known before the first token).
        items: the backend's stream (deltas, then one final output).
        close: cancels the backend stream (frees its engine slot).
        pipeline: the pipeline that builds the final ``PipelineResult``.
    """

    def __init__(self, request: RoutedRequest, items: Iterator[Any], close: Any, pipeline: "Pipeline") -> None:
        self.request = request
        self.result: PipelineResult | None = None
        self._items = items
        self._close = close
        self._pipeline = pipeline

    @property
    def decision(self) -> RouteDecision:
        return self.request.decision

    def __iter__(self) -> Iterator[str]:
        sent = 0
        try:
            for item in self._items:
                if _is_final(item):
                    self.result = self._pipeline._result(self.request, item)
                    rest = _unsent(item.text, sent)
                    if rest:
                        yield rest
                elif item.text:
                    sent += len(item.text)
                    yield item.text
        except AdapterError as exc:
            raise _adapter_failed(self.request, exc) from exc
        finally:
            self.close()

    def close(self) -> None:
        """Stop generating (frees the engine slot)."""
        if self._close is not None:
            close, self._close = self._close, None
            close()


class Pipeline:
    """Routing + dispatch over one backend.

    Args:
        config: the validated config.
        backend: the engine or a ``RemoteBackend``.
        chain: the decision chain (``routers.DecisionChain``).
        router: the learned router (for per-expert scores on ``/v1/route``), if any.
    """

    def __init__(self, config: CoeConfig, backend: Backend, chain: Decider, router: Any = None) -> None:
        self.config = config
        self.backend = backend
        self.chain = chain
        self.router = router
        self._experts = {e.name: e for e in config.experts}
        self._runtime: dict[str, str] = {}  # runtime-loaded adapter name -> source
        self._admin_lock = threading.Lock()
        # Fast tokenizers raise "Already borrowed" when two threads encode at once (padding and
        # truncation state is mutated per call); the routers lock their own encoder.
        self._count_lock = threading.Lock()
        self.ready = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        config: str | Path | CoeConfig,
        engine: Backend | None = None,
        train_router_if_missing: bool = False,
        *,
        router: Any = None,
    ) -> "Pipeline":
        """Load the router (training it if asked and missing), the backend, and validate both.

        Args:
            config: path to experts.yaml or a loaded ``CoeConfig``.
            engine: a ready backend to use instead of building one from the config.
            train_router_if_missing: train and save the router when ``router.path`` has none
                (with a progress bar); otherwise a missing router is a ``RouterError``.
            router: an already loaded router (skips loading).

        Returns:
            A ready ``Pipeline``.

        Raises:
            ConfigError: the config is invalid.
            RouterError: the router is missing (and not trained here) or was trained for other experts.
            AdapterError: an expert's adapter cannot be loaded.
            RemoteBackendError: the remote backend is unreachable or lacks an expert's adapter.
        """
        cfg = config if isinstance(config, CoeConfig) else load_config(config)
        from routers import DecisionChain

        if router is None and cfg.router.type != "none":
            router = _load_or_train_router(cfg, train_router_if_missing)
        chain = DecisionChain(cfg, router=router)
        backend = engine if engine is not None else _build_backend(cfg)
        p = cls(cfg, backend, chain, router=router)
        p.validate()
        return p

    def validate(self) -> None:
        """Check that the backend serves every expert's adapter; marks the pipeline ready."""
        names = {str(_field(a, "name")) for a in self.backend.list_adapters()}
        missing = [e.name for e in self.config.experts if e.adapter is not None and e.name not in names]
        if missing:
            from coe.errors import RemoteBackendError

            if self.config.base_model.backend == "remote":
                raise RemoteBackendError(
                    f"the remote backend at {self.config.base_model.url} does not serve adapter(s) "
                    f"{', '.join(map(repr, missing))} needed by experts.yaml (it serves: {', '.join(sorted(names)) or 'none'}); "
                    f"start it with --enable-lora --lora-modules " + " ".join(f"{m}=<path>" for m in missing)
                )
            raise AdapterError(missing[0], "the engine did not register this expert's adapter")
        self.ready = True

    # ------------------------------------------------------------------ names

    @property
    def base_id(self) -> str:
        return self.config.base_model.served_id

    def model_names(self) -> list[str]:
        """Every name accepted as ``model``: auto, experts, runtime adapters, base."""
        return [AUTO, *self._experts, *sorted(self._runtime), self.base_id]

    def _check_model(self, model: str) -> None:
        if model == AUTO or model == self.base_id or model in self._experts or model in self._runtime:
            return
        from difflib import get_close_matches

        names = self.model_names()
        close = get_close_matches(model, names, n=1) if len(model) <= 200 else []
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownModel(
            f"model {_echo(model)} does not exist; available: {', '.join(names)} (GET /v1/models).{hint}",
            param="model",
        )

    # ------------------------------------------------------------------ routing

    def route(
        self,
        messages: Sequence[Message] | None = None,
        *,
        text: str | None = None,
        metadata: Mapping[str, str] | None = None,
        model: str = AUTO,
    ) -> RouteDecision:
        """Decide which expert answers, without generating.

        Args:
            messages: the conversation (the last user message is routed on).
            text: a bare text to route on instead (e.g. a completion prompt).
            metadata: request metadata for rules (``tenant``, ``user``, ...).
            model: ``auto``, an expert, a runtime adapter or the base model id.

        Returns:
            The ``RouteDecision``.
        """
        model = AUTO if model is None else model
        self._check_model(model)
        if model in self._runtime and model not in self._experts:
            return RouteDecision(expert=model, source="explicit", reason=f"the request named runtime-loaded adapter {model!r}")
        if messages is not None:
            ctx = RouteContext.from_messages(messages, metadata, None if model == AUTO else model)
        else:
            ctx = RouteContext(text=text or "", metadata=dict(metadata or {}), model=None if model == AUTO else model)
        return self.chain.decide(ctx)

    def scores(self, text: str) -> dict[str, float]:
        """The learned router's per-expert probabilities for ``text`` (empty without a router)."""
        if self.router is None:
            return {}
        proba = self.router.predict_proba([text])[0]
        return {name: float(p) for name, p in zip(self.router.experts, proba)}

    def adapter_for(self, decision: RouteDecision) -> str | None:
        """The backend adapter name for a decision (``None``: the base model)."""
        name = decision.expert
        if name is None:
            return None
        if name in self._runtime and name not in self._experts:
            return name
        expert = self._experts.get(name)
        return name if expert is not None and expert.adapter is not None else None

    # ------------------------------------------------------------------ preparing requests

    def prepare_chat(
        self,
        messages: Sequence[Message],
        model: str = AUTO,
        metadata: Mapping[str, str] | None = None,
        sampling: SamplingParams | None = None,
    ) -> RoutedRequest:
        """Route a chat and apply the expert's system prompt and generation defaults.

        Args:
            messages: ``[{"role", "content"}, ...]``; content may be a string or text parts.
            model: ``auto``, an expert, a runtime adapter or the base model id.
            metadata: request metadata for rules.
            sampling: the request's own generation settings (unset fields take defaults).

        Returns:
            The ``RoutedRequest`` to pass to ``run``/``astream``.
        """
        msgs = _normalize_messages(messages)
        t0 = time.perf_counter()
        decision = self.route(msgs, metadata=metadata, model=model)
        route_s = time.perf_counter() - t0
        expert = self._experts.get(decision.expert) if decision.expert else None
        if expert is not None and expert.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": expert.system_prompt}, *msgs]
        params = self._sampling(sampling, expert)
        params = self._fit_context(params, sampling, messages=msgs)
        return RoutedRequest(decision, decision.expert or self.base_id, self.adapter_for(decision),
                             tuple(msgs), None, params, route_s)

    def prepare_completion(
        self,
        prompt: str,
        model: str = AUTO,
        metadata: Mapping[str, str] | None = None,
        sampling: SamplingParams | None = None,
    ) -> RoutedRequest:
        """Route a raw prompt (routed on the prompt text; no chat template, no system prompt)."""
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("prompt: expected a non-empty string", param="prompt")
        t0 = time.perf_counter()
        decision = self.route(None, text=prompt, metadata=metadata, model=model)
        route_s = time.perf_counter() - t0
        expert = self._experts.get(decision.expert) if decision.expert else None
        params = self._sampling(sampling, expert)
        params = self._fit_context(params, sampling, prompt=prompt)
        return RoutedRequest(decision, decision.expert or self.base_id, self.adapter_for(decision),
                             None, prompt, params, route_s)

    def _sampling(self, request: SamplingParams | None, expert: ExpertConfig | None) -> SamplingParams:
        req = request or SamplingParams()
        limit = self.config.serving.max_tokens_limit
        if req.max_tokens is not None and req.max_tokens > limit:
            raise InvalidRequest(
                f"max_tokens: {req.max_tokens} is above this server's limit of {limit} (serving.max_tokens_limit)",
                param="max_tokens",
            )
        defaults = expert.generation.sampling() if expert is not None else SamplingParams()
        merged = req.merged_over(defaults).merged_over(_OPENAI_DEFAULTS)
        if merged.max_tokens is None:
            merged = replace(merged, max_tokens=self.config.serving.max_tokens_default)
        if (merged.temperature or 0.0) < SAMPLING_EPS or (merged.top_p or 1.0) < SAMPLING_EPS:
            merged = replace(merged, temperature=0.0)
        return replace(merged, max_tokens=min(merged.max_tokens, limit))

    def _fit_context(self, params: SamplingParams, request: SamplingParams | None, **prompt: Any) -> SamplingParams:
        """400 when the prompt cannot fit; shrink a defaulted ``max_tokens`` to what fits."""
        count = getattr(self.backend, "count_prompt_tokens", None)
        max_len = getattr(self.backend, "max_seq_len", None)
        if count is None or not max_len:
            return params  # a remote backend checks its own context
        with self._count_lock:
            n = int(count(**prompt))
        room = int(max_len) - n
        if room < 1:
            raise ContextTooLong(
                f"the prompt is {n} tokens, and this model's context is {max_len} tokens "
                "(prompt + max_tokens); shorten the conversation",
                param="messages" if "messages" in prompt else "prompt",
            )
        if params.max_tokens > room:
            if request is not None and request.max_tokens is not None:
                raise ContextTooLong(
                    f"max_tokens: the prompt is {n} tokens, so at most {room} new tokens fit this model's "
                    f"context of {max_len}; ask for max_tokens <= {room}",
                    param="max_tokens",
                )
            params = replace(params, max_tokens=room)
        return params

    # ------------------------------------------------------------------ generation

    def _backend_kwargs(self, req: RoutedRequest) -> dict[str, Any]:
        s = req.sampling
        return dict(
            messages=list(req.messages) if req.messages is not None else None,
            adapter=req.adapter,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
            stop=list(s.stop),
            stop_token_ids=list(s.stop_token_ids),
            timeout=self.config.serving.request_timeout_s,
        )

    def run(self, req: RoutedRequest) -> PipelineResult:
        """Generate a routed request to the end (blocking)."""
        try:
            out = self.backend.generate(req.prompt, **self._backend_kwargs(req))
        except AdapterError as exc:
            raise _adapter_failed(req, exc) from exc
        return self._result(req, out)

    async def astream(self, req: RoutedRequest) -> AsyncIterator[TextDelta | PipelineResult]:
        """Stream a routed request: ``TextDelta`` items, then one ``PipelineResult``.

        Cancelling the consuming task (or ``aclose()``) cancels generation and frees the slot.
        """
        stream = self.backend.astream(req.prompt, **self._backend_kwargs(req))
        sent = 0  # characters streamed so far: the deltas always add up to the final text
        try:
            async for item in stream:
                if _is_final(item):
                    rest = _unsent(item.text, sent)
                    if rest:
                        yield TextDelta(rest)
                    yield self._result(req, item)
                    return
                sent += len(item.text)
                yield TextDelta(item.text, tuple(getattr(item, "token_ids", ()) or ()))
        except AdapterError as exc:
            raise _adapter_failed(req, exc) from exc
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    async def agenerate(self, req: RoutedRequest) -> PipelineResult:
        """Generate to the end without blocking the event loop (cancellable)."""
        result: PipelineResult | None = None
        async for item in self.astream(req):
            if isinstance(item, PipelineResult):
                result = item
        if result is None:
            raise GenerationError(f"the backend ended the stream for {req.model!r} without a final result")
        return result

    def _result(self, req: RoutedRequest, out: Any) -> PipelineResult:
        return PipelineResult(
            text=out.text,
            decision=req.decision,
            model=req.model,
            adapter=req.adapter,
            finish_reason=str(out.finish_reason),
            prompt_tokens=int(out.prompt_tokens or 0),
            completion_tokens=int(out.completion_tokens or 0),
            token_ids=tuple(getattr(out, "token_ids", ()) or ()),
        )

    # ------------------------------------------------------------------ one-call helpers

    def chat(
        self, messages: Sequence[Message], model: str = AUTO, metadata: Mapping[str, str] | None = None, **sampling: Any
    ) -> PipelineResult:
        """Route and answer a chat (blocking).

        Args:
            messages: ``[{"role": "user", "content": "..."}]``.
            model: ``auto`` (route), an expert, a runtime adapter or the base model id.
            metadata: request metadata for rules.
            **sampling: ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``.

        Returns:
            ``PipelineResult`` with ``.text`` and ``.decision``.

        Example:
            >>> r = p.chat([{"role": "user", "content": "What is 17 times 23?"}])
            >>> r.decision.expert, r.decision.source
            ('math', 'router')
        """
        return self.run(self.prepare_chat(messages, model, metadata, _sampling_params(sampling)))

    def complete(
        self, prompt: str, model: str = AUTO, metadata: Mapping[str, str] | None = None, **sampling: Any
    ) -> PipelineResult:
        """Route and complete a raw prompt (blocking); see ``chat`` for the arguments."""
        return self.run(self.prepare_completion(prompt, model, metadata, _sampling_params(sampling)))

    def stream_chat(
        self, messages: Sequence[Message], model: str = AUTO, metadata: Mapping[str, str] | None = None, **sampling: Any
    ) -> ChatStream:
        """Route a chat and stream the answer: iterate for text; ``.decision`` is known at once."""
        req = self.prepare_chat(messages, model, metadata, _sampling_params(sampling))
        it = self.backend.stream(req.prompt, **self._backend_kwargs(req))
        return ChatStream(req, iter(it), getattr(it, "close", None), self)

    # ------------------------------------------------------------------ models and adapters

    def models(self) -> list[dict[str, Any]]:
        """Every servable model: ``auto``, the experts, runtime adapters, the base model."""
        base = self.base_id
        out: list[dict[str, Any]] = [
            {"id": AUTO, "kind": "router", "parent": base, "adapter": None,
             "description": f"routes each request to one of: {', '.join(self._experts)}"},
        ]
        for e in self.config.experts:
            out.append({"id": e.name, "kind": "expert", "parent": base,
                        "adapter": e.name if e.adapter is not None else None, "description": e.description})
        for name, source in sorted(self._runtime.items()):
            out.append({"id": name, "kind": "adapter", "parent": base, "adapter": name,
                        "description": f"runtime-loaded from {source}"})
        out.append({"id": base, "kind": "base", "parent": None, "adapter": None,
                    "description": "the base model without an adapter"})
        return out

    def list_adapters(self) -> list[dict[str, Any]]:
        """The backend's adapters: where each lives, bytes, pinned, in-flight, and its expert."""
        rows = []
        for a in self.backend.list_adapters():
            name = str(_field(a, "name"))
            rows.append({
                "name": name,
                "source": str(_field(a, "source", "") or ""),
                "location": str(_field(a, "location", "unknown")),
                "bytes": int(_field(a, "bytes", 0) or 0),
                "pinned": bool(_field(a, "pinned", False)),
                "in_flight": int(_field(a, "in_flight", 0) or 0),
                "rank": _field(a, "rank", None),
                "expert": name if name in self._experts else None,
            })
        return rows

    def load_adapter(self, name: str, path: str) -> dict[str, Any]:
        """Load an adapter at runtime (admin API); usable as ``model=name`` at once.

        Args:
            name: the new model name (a slug; not ``auto``, an expert or the base model).
            path: adapter dir, which must lie under one of ``serving.adapter_roots``.

        Returns:
            The adapter's row as in ``list_adapters``.

        Raises:
            InvalidRequest: bad or taken name.
            AdapterPathForbidden: the path is outside ``serving.adapter_roots`` (or runtime
                loading is disabled because no roots are configured).
            AdapterNotFound: the path does not exist.
            AdapterError: the adapter cannot be loaded (corrupt, rank too high, ...).
        """
        if not EXPERT_NAME_RE.match(name or ""):
            raise InvalidRequest(
                f"lora_name: {name!r} is not a valid name; expected lowercase letters, digits, '_', '-' or '.' "
                "(it becomes the `model` name)", param="lora_name",
            )
        if name in RESERVED_MODEL_NAMES or name == self.base_id or name in self._experts:
            raise InvalidRequest(
                f"lora_name: {name!r} is already taken by {'the router' if name == AUTO else 'the base model' if name == self.base_id else 'an expert in experts.yaml'}; pick another name",
                param="lora_name",
            )
        source = self._allowed_path(path)
        with self._admin_lock:
            if name in self._runtime:
                raise InvalidRequest(
                    f"lora_name: adapter {name!r} is already loaded (from {self._runtime[name]}); unload it first",
                    param="lora_name",
                )
            self.backend.load_adapter(name, source)
            self._runtime[name] = source
        logger.info("loaded adapter %r from %s", name, source)
        for row in self.list_adapters():
            if row["name"] == name:
                return row
        return {"name": name, "source": source, "location": "unknown", "bytes": 0, "pinned": False,
                "in_flight": 0, "rank": None, "expert": None}

    def unload_adapter(self, name: str) -> None:
        """Unload a runtime-loaded adapter (experts' adapters are part of the config and stay)."""
        with self._admin_lock:
            if name in self._experts:
                raise InvalidRequest(
                    f"lora_name: {name!r} is the adapter of an expert declared in experts.yaml; "
                    "only runtime-loaded adapters can be unloaded (edit experts.yaml to remove an expert)",
                    param="lora_name",
                )
            if name not in self._runtime:
                loaded = ", ".join(sorted(self._runtime)) or "none"
                raise AdapterNotFound(name, f"is not a runtime-loaded adapter (runtime-loaded: {loaded})", param="lora_name")
            self.backend.unload_adapter(name)
            del self._runtime[name]
        logger.info("unloaded adapter %r", name)

    def _allowed_path(self, path: str) -> str:
        """Resolve ``path`` and check it lies under ``serving.adapter_roots`` (symlinks followed)."""
        roots = self.config.serving.adapter_roots
        if not roots:
            raise AdapterPathForbidden(
                str(path), "runtime loading is disabled: serving.adapter_roots is empty; "
                "list the directories adapters may be loaded from", param="lora_path",
            )
        if not isinstance(path, str) or not path or "\x00" in path:
            raise InvalidRequest("lora_path: expected a directory path", param="lora_path")
        remote = self.config.base_model.backend == "remote"
        if remote:
            # The path names a file on the remote machine: we can only check it lexically.
            import posixpath

            norm = posixpath.normpath(path)
            under = [posixpath.normpath(r) for r in roots]
            if not posixpath.isabs(norm) or not any(norm == r or norm.startswith(r.rstrip("/") + "/") for r in under):
                raise AdapterPathForbidden(
                    path, f"lora_path must be an absolute path on the remote backend under one of: {', '.join(under)}",
                    param="lora_path",
                )
            return norm
        resolved_roots = [self.config.resolve_path(r).resolve() for r in roots]
        candidate = self.config.resolve_path(path).resolve()
        if not any(candidate == r or candidate.is_relative_to(r) for r in resolved_roots):
            raise AdapterPathForbidden(
                path, f"lora_path resolves to {candidate}, outside serving.adapter_roots "
                f"({', '.join(str(r) for r in resolved_roots)}); move the adapter under a root",
                param="lora_path",
            )
        if not candidate.exists():
            raise AdapterNotFound(path, f"lora_path {candidate} does not exist", param="lora_path")
        if candidate.is_dir():
            # The backend reads the files inside; a symlinked file must not escape the roots either.
            for entry in candidate.iterdir():
                target = entry.resolve()
                if entry.is_symlink() and not any(target == r or target.is_relative_to(r) for r in resolved_roots):
                    raise AdapterPathForbidden(
                        path, f"{entry.name} in lora_path is a symlink to {target}, outside serving.adapter_roots "
                        f"({', '.join(str(r) for r in resolved_roots)}); copy the file into the adapter folder",
                        param="lora_path",
                    )
        return str(candidate)

    # ------------------------------------------------------------------ lifecycle

    def stats(self) -> dict[str, Any]:
        """The backend's statistics (queue depth, running, ...)."""
        fn = getattr(self.backend, "stats", None)
        return dict(fn() or {}) if fn is not None else {}

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Stop the backend; in-flight work gets ``grace_s`` seconds to finish."""
        self.ready = False
        fn = getattr(self.backend, "shutdown", None)
        if fn is not None:
            fn(grace_s)


# --------------------------------------------------------------------------- helpers


def _load_or_train_router(cfg: CoeConfig, train: bool) -> Any:
    from routers import load_router, train_router

    path = cfg.router_path
    if not path.exists():
        if not train:
            raise RouterError(
                f"router.path: no trained router at {path}; run `coe train-router --config {cfg.source_path or 'experts.yaml'}` "
                "first (or start `coe serve` without --no-train)"
            )
        logger.info("no trained router at %s: training a %s router (one-time)", path, cfg.router.type)
        trained = train_router(cfg)
        if trained is not None and hasattr(trained, "predict_proba"):
            return trained
    return load_router(str(path), cfg)


def _build_backend(cfg: CoeConfig) -> Backend:
    if cfg.base_model.backend == "remote":
        from coe.remote import RemoteBackend

        return RemoteBackend(cfg)
    from coe.engine import Engine

    return Engine.from_config(cfg)


def _normalize_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidRequest("messages: expected a non-empty list of {role, content} messages", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"messages[{i}]: expected an object with role and content", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in CHAT_ROLES:
            raise InvalidRequest(
                f"messages[{i}].role: {role!r} is not a role; expected one of system, developer, user, assistant",
                param=f"messages[{i}].role",
            )
        out.append({"role": role, "content": content_text(m.get("content"))})
    return out


def _sampling_params(kw: Mapping[str, Any]) -> SamplingParams:
    kw = dict(kw)
    stop = kw.pop("stop", None)
    stop_ids = kw.pop("stop_token_ids", None)
    unknown = set(kw) - {"max_tokens", "temperature", "top_p", "top_k", "seed"}
    if unknown:
        raise InvalidRequest(f"unknown generation setting(s): {', '.join(sorted(unknown))}", param=sorted(unknown)[0])
    return SamplingParams(
        **kw,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        stop_token_ids=tuple(stop_ids or ()),
    )


def _is_final(item: Any) -> bool:
    """Engine/remote streams end with an object that has a ``finish_reason``; deltas have none."""
    return getattr(item, "finish_reason", None) is not None


def _unsent(final_text: str, sent_chars: int) -> str:
    """Text of the final output not yet streamed (a backend may send little or nothing as deltas)."""
    return final_text[sent_chars:] if len(final_text) > sent_chars else ""


def _echo(value: Any) -> str:
    """``repr(value)``, cut to ``_ECHO_CHARS`` characters."""
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else text[: _ECHO_CHARS - 5] + "...'"


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, Mapping) else getattr(obj, name, default)


def _adapter_failed(req: RoutedRequest, exc: AdapterError) -> GenerationError:
    who = f"expert {req.decision.expert!r}" if req.decision.expert else "the base model"
    return GenerationError(f"{who} could not use its adapter: {exc.message}")
