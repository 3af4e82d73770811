"""Fakes for the server's unit tests: a deterministic engine and decision chain, no torch.

``FakeEngine`` follows the engine's contract (generate / stream / astream / adapters / stats /
shutdown): its "model" emits the words of ``"<adapter or base> heard <last user message>"``,
one word per token, so tests can tell which adapter answered and whether max_tokens and stop
strings were honoured. ``FakeChain`` routes on keywords the way the real chain would.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator

from coe.config import CoeConfig, config_from_dict
from coe.errors import AdapterNotFound, QueueFull, UnknownModel
from coe.types import RouteContext, RouteDecision, last_user_text


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Output:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Info:
    name: str
    source: str
    location: str = "cpu"
    bytes: int = 1024
    pinned: bool = False
    in_flight: int = 0
    rank: int = 4


class FakeEngine:
    """Engine contract, deterministic words instead of a model.

    Args:
        config: the coe config (experts with adapters get registered under their names).
        delay_s: sleep between streamed tokens (to test concurrency and cancellation).
        max_running: more concurrent streams than this raise QueueFull.
    """

    def __init__(self, config: CoeConfig, delay_s: float = 0.0, max_running: int = 64) -> None:
        self.model_id = config.base_model.served_id
        self.max_seq_len = config.serving.max_seq_len
        self.delay_s = delay_s
        self.max_running = max_running
        self.adapters = {e.name: Info(e.name, e.adapter) for e in config.experts if e.adapter is not None}
        self.calls: list[dict[str, Any]] = []
        self.running = 0
        self.peak_running = 0
        self.cancelled = 0
        self.finished = 0
        self.shutdown_called = False
        self._lock = threading.Lock()

    # --- contract
    def count_prompt_tokens(self, prompt: str | None = None, messages: Any = None) -> int:
        if messages is not None:
            return sum(len(str(m["content"]).split()) + 2 for m in messages)
        return len((prompt or "").split())

    def _words(self, prompt: str | None, messages: Any, adapter: str | None) -> list[str]:
        if adapter is not None and adapter not in self.adapters:
            raise UnknownModel(f"adapter {adapter!r} is not registered")
        heard = last_user_text(messages) if messages is not None else (prompt or "")
        return f"{adapter or 'base'} heard {heard}".split()

    def _finish(self, words: list[str], max_tokens: int, stop: list[str] | None) -> tuple[list[str], str]:
        out, reason = [], "stop"
        for w in words:
            if len(out) >= max_tokens:
                reason = "length"
                break
            if stop and any(s in w for s in stop):
                break
            out.append(w)
        return out, reason

    def generate(self, prompt: str | None = None, *, messages: Any = None, adapter: str | None = None, **kw: Any) -> Output:
        self.calls.append(dict(kw, prompt=prompt, messages=messages, adapter=adapter))
        words = self._words(prompt, messages, adapter)
        out, reason = self._finish(words, kw["max_tokens"], kw.get("stop"))
        n = self.count_prompt_tokens(prompt, messages)
        return Output(" ".join(out), tuple(range(len(out))), reason, n, len(out))

    def stream(self, prompt: str | None = None, *, messages: Any = None, adapter: str | None = None, **kw: Any) -> Iterator[Any]:
        full = self.generate(prompt, messages=messages, adapter=adapter, **kw)
        for i, w in enumerate(full.text.split()):
            yield Delta(w if i == 0 else " " + w, (i,))
        yield full

    async def astream(self, prompt: str | None = None, *, messages: Any = None, adapter: str | None = None, **kw: Any) -> AsyncIterator[Any]:
        self.calls.append(dict(kw, prompt=prompt, messages=messages, adapter=adapter))
        with self._lock:
            if self.running >= self.max_running:
                raise QueueFull("the engine queue is full (fake)", retry_after_s=2)
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
        done = False
        try:
            words = self._words(prompt, messages, adapter)
            out, reason = self._finish(words, kw["max_tokens"], kw.get("stop"))
            for i, w in enumerate(out):
                await asyncio.sleep(self.delay_s)
                yield Delta(w if i == 0 else " " + w, (i,))
            n = self.count_prompt_tokens(prompt, messages)
            self.finished += 1
            done = True
            yield Output(" ".join(out), tuple(range(len(out))), reason, n, len(out))
        except (asyncio.CancelledError, GeneratorExit):
            if not done:
                self.cancelled += 1
            raise
        finally:
            with self._lock:
                self.running -= 1

    def list_adapters(self) -> list[Info]:
        return list(self.adapters.values())

    def load_adapter(self, name: str, source: str) -> None:
        self.adapters[name] = Info(name, source)

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise AdapterNotFound(name, "not loaded")
        del self.adapters[name]

    def stats(self) -> dict[str, Any]:
        return {"running": self.running, "queue_depth": 0, "finished": self.finished, "accepting": True,
                "max_queue_wait_s": {"sql": 0.5}, "model_id": self.model_id}

    def shutdown(self, grace_s: float = 0.0) -> None:
        self.shutdown_called = True


class FakeChain:
    """The decision chain's contract with keyword routing instead of a classifier."""

    KEYWORDS = {"sql": ("table", "select", "query"), "json": ("json", "extract"), "math": ("plus", "times", "sum")}

    def __init__(self, config: CoeConfig) -> None:
        self.config = config

    def decide(self, ctx: RouteContext) -> RouteDecision:
        names = self.config.expert_names
        if ctx.model == self.config.base_model.served_id:
            return RouteDecision(expert=None, source="explicit", reason="the request named the base model")
        if ctx.model is not None:
            if ctx.model not in names:
                raise UnknownModel(f"model {ctx.model!r} does not exist")
            return RouteDecision(expert=ctx.model, source="explicit", reason=f"the request named {ctx.model!r}")
        if ctx.metadata.get("tenant") == "acme":
            return RouteDecision(expert="general", source="rule", reason="rule 'acme' matched", rule="acme")
        words = ctx.text.lower().split()
        for expert, keys in self.KEYWORDS.items():
            if expert in names and any(k in words for k in keys):
                scores = {n: (0.9 if n == expert else 0.1 / (len(names) - 1)) for n in names}
                return RouteDecision(expert=expert, source="router", score=0.9, scores=scores,
                                     reason="router score 0.90 >= threshold 0.50")
        scores = {n: 1.0 / len(names) for n in names}
        return RouteDecision(expert=self.config.router.fallback, source="fallback", score=max(scores.values()),
                             scores=scores, reason="top score below threshold 0.50")


def fake_config(tmp_path, **serving: Any) -> CoeConfig:
    """A four-expert config over a fake base model; ``adapters/`` under tmp_path is the root."""
    (tmp_path / "adapters").mkdir(exist_ok=True)
    data = {
        "version": 1,
        "base_model": {"model": "fake-base", "id": "fake-base"},
        "router": {"type": "none", "fallback": "general"},
        "experts": [
            {"name": "sql", "adapter": "adapters/sql", "system_prompt": "You write SQL.",
             "generation": {"max_tokens": 6, "temperature": 0.0}},
            {"name": "json", "adapter": "adapters/json"},
            {"name": "math", "adapter": "adapters/math", "generation": {"stop": ["STOP"]}},
            {"name": "general", "adapter": None, "description": "the base model"},
        ],
        "serving": {"adapter_roots": ["adapters"], "max_tokens_limit": 64, "max_tokens_default": 16,
                    "max_seq_len": 64, "max_body_bytes": 4096, **serving},
    }
    return config_from_dict(data, source_path=str(tmp_path / "experts.yaml"))
