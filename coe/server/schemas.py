"""Request and response bodies of the HTTP API (OpenAI's shapes, plus coe's ``coe`` block).

msgspec Structs: Litestar decodes and validates request bodies into them (a wrong type or an
out-of-range value is a 400 before a handler runs) and documents them in the OpenAPI schema
at ``/schema``. Unknown fields are refused, and OpenAI parameters coe does not implement are
accepted only at their neutral value (``n: 1``, ``presence_penalty: 0``, ...): anything else
is a 400 naming the parameter, never silently ignored.

This module knows the wire format only; limits that depend on the config (``max_tokens``
above ``serving.max_tokens_limit``) are checked by the pipeline.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from coe.errors import InvalidRequest
from coe.types import SamplingParams

PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=0)]
Role = Literal["system", "developer", "user", "assistant"]


class _Body(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of request bodies: unknown fields are a 400 naming the field."""


# --------------------------------------------------------------------------- requests


class ContentPart(_Body):
    """One part of a multi-part message; coe serves text models, so only ``text`` parts."""

    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    """A chat message. ``developer`` is OpenAI's newer name for ``system`` and is treated so."""

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def to_message(self) -> dict[str, Any]:
        if isinstance(self.content, list):
            content = "".join(p.text for p in self.content)
        else:
            content = self.content or ""
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Body):
    include_usage: bool = False


# OpenAI parameters that coe does not implement, with the values that mean "not used".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
}


class _GenerationBody(_Body):
    """Fields shared by chat and text completions."""

    model: str = "auto"
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    # Accepted only at their neutral values (see _NEUTRAL).
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    service_tier: Any = None
    store: Any = None

    def check_supported(self) -> None:
        """Raise ``InvalidRequest`` naming the first parameter coe cannot honour."""
        for name in self.__struct_fields__:
            allowed = _NEUTRAL.get(name)
            if allowed is None:
                continue
            value = getattr(self, name)
            if value not in allowed:
                shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:75] + "..."
                raise InvalidRequest(
                    f"{name}={shown} is not supported by coe; remove it"
                    + (" (n > 1: send separate requests)" if name == "n" else ""),
                    param=name,
                )
        if self.stop is not None:
            stops = [self.stop] if isinstance(self.stop, str) else self.stop
            if len(stops) > 16 or any(not s for s in stops):
                raise InvalidRequest("stop: expected up to 16 non-empty strings", param="stop")

    def sampling(self) -> SamplingParams:
        """The request's own sampling values (``None`` where unset)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=self.requested_max_tokens(), temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=stop,
        )

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def route_metadata(self) -> dict[str, str]:
        """OpenAI ``metadata`` plus ``user``: what metadata rules match on."""
        meta = dict(self.metadata or {})
        if self.user is not None:
            meta.setdefault("user", self.user)
        return meta

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_GenerationBody):
    """``POST /v1/chat/completions``.

    ``model`` is ``"auto"`` (route), an expert's name, a runtime-loaded adapter, or the base
    model's id. ``max_completion_tokens`` is OpenAI's newer name for ``max_tokens``.
    """

    messages: Annotated[list[ChatMessage], Meta(min_length=1)] = msgspec.field(default_factory=list)
    max_completion_tokens: PositiveInt | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    response_format: Any = None
    modalities: Any = None
    reasoning_effort: Any = None

    def check_supported(self) -> None:
        if not self.messages:
            raise InvalidRequest("messages: expected a non-empty list of {role, content} messages", param="messages")
        super().check_supported()

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_messages(self) -> list[dict[str, Any]]:
        return [m.to_message() for m in self.messages]


class CompletionRequest(_GenerationBody):
    """``POST /v1/completions``: a raw prompt (no chat template, no system prompt)."""

    prompt: str | list[str] = ""
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    def check_supported(self) -> None:
        super().check_supported()
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise InvalidRequest(
                f"prompt: a list of {len(self.prompt)} prompts is not supported; send one prompt per request",
                param="prompt",
            )
        if not self.prompt_text():
            raise InvalidRequest("prompt: expected a non-empty string", param="prompt")

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class RouteRequest(_Body):
    """``POST /v1/route``: give ``messages`` or ``text`` (and optional metadata)."""

    messages: list[ChatMessage] | None = None
    text: str | None = None
    metadata: dict[str, str] | None = None
    model: str = "auto"


class LoadLoraRequest(_Body):
    """``POST /v1/load_lora_adapter`` (vLLM's name and shape)."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraRequest(_Body):
    """``POST /v1/unload_lora_adapter`` (vLLM's name and shape)."""

    lora_name: str
    lora_int_id: int | None = None


# --------------------------------------------------------------------------- responses


class CoeInfo(Struct):
    """Which expert answered and why; the top-level ``coe`` field of every completion."""

    expert: str | None
    adapter: str | None
    source: str
    score: float | None
    reason: str


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Struct):
    role: str
    content: str


class ChatChoice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    coe: CoeInfo
    object: str = "chat.completion"


class DeltaMessage(Struct):
    """A stream delta; unset fields are left out of the JSON (``{}`` on the finish chunk)."""

    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChunkChoice(Struct):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | UnsetType = UNSET
    coe: CoeInfo | UnsetType = UNSET


class TextChoice(Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class TextCompletion(Struct):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    object: str = "text_completion"
    usage: Usage | UnsetType = UNSET
    coe: CoeInfo | UnsetType = UNSET


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str
    root: str
    parent: str | None
    coe: dict[str, Any]
    object: str = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: str = "list"


class RouteResponse(Struct):
    expert: str | None
    adapter: str | None
    model: str
    source: str
    score: float | None
    reason: str
    scores: dict[str, float]
    rule: str | None
    latency_ms: float


class AdapterCard(Struct):
    name: str
    source: str
    location: str
    bytes: int
    pinned: bool
    in_flight: int
    rank: int | None
    expert: str | None


class AdapterList(Struct):
    data: list[AdapterCard]
    object: str = "list"
