"""A remote OpenAI-compatible multi-LoRA server as coe's generation backend (``backend: remote``).

For deployments that outgrow one machine: coe keeps routing, rules and metrics, and forwards
generation to a server such as vLLM started with ``--enable-lora --lora-modules name=path``
(or another coe). Each request goes out with ``model=<adapter name>`` (the expert's name) or
the base model's served id for experts without an adapter. Streams are passed through as
they arrive. Timeouts, connection failures and HTTP errors become coe errors:

=========================  ===================================================
remote answer              coe error (HTTP status coe returns)
=========================  ===================================================
timeout                    ``RequestTimeout`` (504)
cannot connect             ``RemoteBackendError`` (502)
400 / 422                  ``InvalidRequest`` (400), remote message kept
401 / 403                  ``RemoteBackendError`` (502): coe's key for it is wrong
404                        ``RemoteBackendError`` (502): it lacks the adapter
429                        ``QueueFull`` (429, Retry-After passed on)
503                        ``EngineUnavailable`` (503)
other 5xx                  ``RemoteBackendError`` (502)
=========================  ===================================================

Offers the same subset as ``coe.engine.Engine`` that the pipeline uses (generate, stream,
astream, list_adapters, load/unload_adapter, stats, shutdown). It knows nothing about routing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Sequence

import httpx

from coe.config import CoeConfig
from coe.errors import (
    EngineUnavailable,
    InvalidRequest,
    QueueFull,
    RemoteBackendError,
    RequestTimeout,
)
from coe.types import Message

logger = logging.getLogger("coe.remote")


@dataclass(frozen=True)
class RemoteDelta:
    """A streamed text piece (the remote sends text, not token ids)."""

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class RemoteOutput:
    """A finished remote generation (same fields as the engine's ``GenerationOutput``)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RemoteAdapter:
    """A model the remote serves, shaped like the engine's ``AdapterInfo``."""

    name: str
    source: str
    location: str = "remote"
    bytes: int = 0
    pinned: bool = False
    in_flight: int = 0
    rank: int | None = None


class RemoteBackend:
    """Forwards generation to ``base_model.url`` (an OpenAI-compatible ``/v1`` base URL).

    Args:
        config: the coe config (``base_model.backend: remote``).
        transport: an httpx transport to use instead of the network (tests of error mapping).

    Example:
        >>> b = RemoteBackend(load_config("experts.remote.yaml"))
        >>> b.generate(messages=[{"role": "user", "content": "hi"}], adapter="sql", max_tokens=8).text
    """

    def __init__(self, config: CoeConfig, *, transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None) -> None:
        b = config.base_model
        if not b.url:
            raise RemoteBackendError("base_model.url is not set")
        self.url = b.url.rstrip("/")
        self.model_id = b.served_id
        self.max_seq_len = None  # the remote checks its own context window
        key = b.api_key or (os.environ.get(b.api_key_env) if b.api_key_env else None)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = httpx.Timeout(b.timeout_s, connect=min(10.0, b.timeout_s))
        self._client = httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout, transport=transport)
        self._async_transport = async_transport
        # httpx.AsyncClient pools connections per event loop: one client per loop.
        self._aclients: dict[int, httpx.AsyncClient] = {}
        self._lock = threading.Lock()
        self._in_flight = 0
        self._requests = 0
        self._errors = 0

    # ------------------------------------------------------------------ generation

    def _body(self, prompt: str | None, messages: Sequence[Message] | None, adapter: str | None,
              stream: bool, kw: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": adapter or self.model_id, "stream": stream}
        if messages is not None:
            path = "/chat/completions"
            body["messages"] = [dict(m) for m in messages]
        else:
            path = "/completions"
            body["prompt"] = prompt or ""
        for name in ("max_tokens", "temperature", "top_p", "seed"):
            if kw.get(name) is not None:
                body[name] = kw[name]
        if kw.get("top_k"):  # vLLM extension; omitted when unused so plain OpenAI servers accept the body
            body["top_k"] = kw["top_k"]
        if kw.get("stop"):
            body["stop"] = list(kw["stop"])
        if kw.get("stop_token_ids"):
            body["stop_token_ids"] = list(kw["stop_token_ids"])
        if stream:
            body["stream_options"] = {"include_usage": True}
        return path, body

    def _timeout_for(self, kw: dict[str, Any]) -> httpx.Timeout:
        t = kw.get("timeout")
        return httpx.Timeout(float(t), connect=min(10.0, float(t))) if t else self._timeout

    def generate(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                 adapter: str | None = None, **kw: Any) -> RemoteOutput:
        """One blocking request; see the engine's ``generate`` for the arguments."""
        path, body = self._body(prompt, messages, adapter, False, kw)
        self._enter()
        try:
            try:
                resp = self._client.post(path, json=body, timeout=self._timeout_for(kw))
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, body["model"]) from exc
            if resp.status_code >= 400:
                raise self._status_error(resp.status_code, resp.text, resp.headers, body["model"])
            return _parse_full(resp.json(), chat=messages is not None)
        finally:
            self._exit()

    def stream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
               adapter: str | None = None, **kw: Any) -> Iterator[RemoteDelta | RemoteOutput]:
        """Blocking stream: ``RemoteDelta`` items then one ``RemoteOutput``; ``close()`` cancels."""
        path, body = self._body(prompt, messages, adapter, True, kw)
        self._enter()
        try:
            try:
                with self._client.stream("POST", path, json=body, timeout=self._timeout_for(kw)) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        raise self._status_error(resp.status_code, resp.text, resp.headers, body["model"])
                    acc = _Accumulator(chat=messages is not None)
                    for line in resp.iter_lines():
                        delta = acc.feed(line)
                        if delta:
                            yield RemoteDelta(delta)
                        if acc.done:
                            break
                    yield acc.output()
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, body["model"]) from exc
        finally:
            self._exit()

    async def astream(self, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                      adapter: str | None = None, **kw: Any) -> AsyncIterator[RemoteDelta | RemoteOutput]:
        """Async stream; cancelling the consumer closes the HTTP stream, which cancels remotely."""
        path, body = self._body(prompt, messages, adapter, True, kw)
        client = self._aclient()
        self._enter()
        try:
            try:
                async with client.stream("POST", path, json=body, timeout=self._timeout_for(kw)) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        raise self._status_error(resp.status_code, resp.text, resp.headers, body["model"])
                    acc = _Accumulator(chat=messages is not None)
                    async for line in resp.aiter_lines():
                        delta = acc.feed(line)
                        if delta:
                            yield RemoteDelta(delta)
                        if acc.done:
                            break
                    yield acc.output()
            except httpx.HTTPError as exc:
                raise self._transport_error(exc, body["model"]) from exc
        finally:
            self._exit()

    def _aclient(self) -> httpx.AsyncClient:
        loop_id = id(asyncio.get_running_loop())
        client = self._aclients.get(loop_id)
        if client is None:
            client = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                       transport=self._async_transport)
            self._aclients[loop_id] = client
        return client

    # ------------------------------------------------------------------ models and adapters

    def list_adapters(self) -> list[RemoteAdapter]:
        """The models the remote serves other than the base (its LoRA adapters)."""
        data = self._get_json("/models")
        rows = []
        for m in data.get("data", []) if isinstance(data, dict) else []:
            mid = str(m.get("id", ""))
            if mid and mid != self.model_id:
                rows.append(RemoteAdapter(name=mid, source=str(m.get("root") or mid)))
        return rows

    def load_adapter(self, name: str, source: str) -> None:
        """Forward to the remote's ``/load_lora_adapter`` (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)."""
        self._post_admin("/load_lora_adapter", {"lora_name": name, "lora_path": source}, name)

    def unload_adapter(self, name: str) -> None:
        """Forward to the remote's ``/unload_lora_adapter``."""
        self._post_admin("/unload_lora_adapter", {"lora_name": name}, name)

    def _get_json(self, path: str) -> Any:
        try:
            resp = self._client.get(path)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, None) from exc
        if resp.status_code >= 400:
            raise self._status_error(resp.status_code, resp.text, resp.headers, None)
        try:
            return resp.json()
        except ValueError as exc:
            raise RemoteBackendError(f"remote backend at {self.url}{path} did not answer JSON") from exc

    def _post_admin(self, path: str, body: dict[str, Any], name: str) -> None:
        try:
            resp = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, name) from exc
        if resp.status_code >= 400:
            raise self._status_error(resp.status_code, resp.text, resp.headers, name)

    # ------------------------------------------------------------------ errors and stats

    def _transport_error(self, exc: httpx.HTTPError, model: str | None) -> Exception:
        with self._lock:
            self._errors += 1
        if isinstance(exc, httpx.TimeoutException):
            return RequestTimeout(f"the remote backend at {self.url} did not answer in time "
                                  f"({type(exc).__name__}); raise base_model.timeout_s or check the backend")
        return RemoteBackendError(f"cannot reach the remote backend at {self.url}: {type(exc).__name__}: {exc}")

    def _status_error(self, status: int, text: str, headers: Any, model: str | None) -> Exception:
        with self._lock:
            self._errors += 1
        message, param = _remote_message(text)
        where = f"remote backend at {self.url}"
        if status in (400, 422):
            return InvalidRequest(message or f"{where} refused the request ({status})", param=param)
        if status in (401, 403):
            return RemoteBackendError(f"{where} refused coe's credentials ({status}); set base_model.api_key_env "
                                      f"to the variable holding its key: {message}", status=status)
        if status == 404:
            return RemoteBackendError(
                f"{where} does not serve model {model!r} ({message}); start it with --enable-lora "
                f"--lora-modules {model}=<adapter path>", status=status,
            )
        if status == 429:
            try:
                retry = float(headers.get("retry-after", "1"))
            except (TypeError, ValueError):
                retry = 1.0
            return QueueFull(f"{where} is busy: {message}", retry_after_s=retry)
        if status == 503:
            return EngineUnavailable(f"{where} is unavailable: {message}")
        return RemoteBackendError(f"{where} failed with HTTP {status}: {message}", status=status)

    def _enter(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._requests += 1

    def _exit(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"remote_in_flight": self._in_flight, "remote_requests": self._requests, "remote_errors": self._errors}

    def shutdown(self, grace_s: float = 0.0) -> None:
        """Close the blocking client; async clients are closed by ``aclose`` (or dropped)."""
        self._client.close()

    async def aclose(self) -> None:
        """Close the async client of the running loop (the server's lifespan calls this)."""
        client = self._aclients.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            await client.aclose()


# --------------------------------------------------------------------------- vLLM


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def vllm_command(config: CoeConfig, port: int = 8001) -> str:
    """The ``vllm serve`` command line that serves what ``config`` declares, for ``backend: remote``.

    Each expert with an adapter becomes ``--lora-modules <expert>=<adapter>`` (local dirs made
    absolute), the base model is served under coe's ``served_id``, and runtime adapter loading
    is enabled so coe's admin API can forward ``load_lora_adapter``.

    Args:
        config: the experts.yaml to mirror.
        port: the port vLLM listens on.
    """
    b = config.base_model
    model = b.model or SMOLLM2_HUB_ID  # the embedded GGUF's original weights on the hub
    if b.model and config.resolve_path(b.model).exists():
        model = str(config.resolve_path(b.model))
    modules = []
    for e in config.experts:
        if e.adapter is None:
            continue
        local = config.resolve_path(e.adapter)
        modules.append(f"{e.name}={local if local.exists() or e.adapter.startswith(('.', '/', '~')) else e.adapter}")
    parts = [
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve", model,
        f"--served-model-name {b.served_id}",
        f"--max-model-len {config.serving.max_seq_len}",
    ]
    if modules:
        parts += ["--enable-lora", f"--max-loras {config.serving.max_loras}",
                  f"--max-lora-rank {config.serving.max_lora_rank}", "--lora-modules " + " ".join(modules)]
    parts.append(f"--port {port}")
    return " \\\n    ".join(parts)


# --------------------------------------------------------------------------- parsing


class _Accumulator:
    """Parses an OpenAI SSE stream line by line, keeping the text, finish reason and usage."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.parts: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.done = False

    def feed(self, line: str) -> str:
        line = line.strip()
        if not line.startswith("data:"):
            return ""
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return ""
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise RemoteBackendError(f"remote backend sent an unreadable stream event: {data[:200]!r}") from exc
        if "error" in obj:
            err = obj["error"] if isinstance(obj["error"], dict) else {"message": str(obj["error"])}
            raise RemoteBackendError(f"remote backend failed mid-stream: {err.get('message')}")
        if obj.get("usage"):
            self.usage = obj["usage"]
        text = ""
        for choice in obj.get("choices") or []:
            if self.chat:
                text += (choice.get("delta") or {}).get("content") or ""
            else:
                text += choice.get("text") or ""
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if text:
            self.parts.append(text)
        return text

    def output(self) -> RemoteOutput:
        if self.finish_reason is None:
            raise RemoteBackendError("the remote backend's stream ended without a finish_reason (truncated)")
        return RemoteOutput(
            text="".join(self.parts), token_ids=(), finish_reason=self.finish_reason,
            prompt_tokens=int(self.usage.get("prompt_tokens") or 0),
            completion_tokens=int(self.usage.get("completion_tokens") or 0),
        )


def _parse_full(obj: Any, chat: bool) -> RemoteOutput:
    try:
        choice = obj["choices"][0]
        text = (choice["message"].get("content") or "") if chat else (choice.get("text") or "")
        usage = obj.get("usage") or {}
        return RemoteOutput(
            text=text, token_ids=(), finish_reason=str(choice.get("finish_reason") or "stop"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise RemoteBackendError(f"the remote backend's answer is not an OpenAI completion: {str(obj)[:200]}") from exc


def _remote_message(text: str) -> tuple[str, str | None]:
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:500], None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or "")[:1000], err.get("param")
    if isinstance(obj, dict) and "detail" in obj:  # FastAPI-style servers
        return str(obj["detail"])[:1000], None
    return text.strip()[:500], None
