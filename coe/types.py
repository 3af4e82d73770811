"""Plain data types shared by routers, engine, pipeline and server.

Deliberately free of logic and of heavy imports: everything here is a frozen dataclass
or a type alias, so any layer can import it without pulling in torch or SetFit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

Message = Mapping[str, Any]
"""A chat message: ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``."""

RouteSource = Literal["explicit", "rule", "router", "fallback"]


@dataclass(frozen=True)
class RouteContext:
    """Everything the decision chain may look at for one request.

    Args:
        text: the text routed on (the last user message, or a completion prompt).
        messages: the whole conversation, when the request is a chat.
        metadata: request metadata (OpenAI ``metadata`` plus ``user``), e.g. ``{"tenant": "acme"}``.
        model: the ``model`` field of the request (``"auto"``, an expert, or the base model id).
    """

    text: str
    messages: tuple[Message, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None

    @classmethod
    def from_messages(
        cls, messages: Sequence[Message], metadata: Mapping[str, str] | None = None, model: str | None = None
    ) -> "RouteContext":
        return cls(text=last_user_text(messages), messages=tuple(messages), metadata=dict(metadata or {}), model=model)


def last_user_text(messages: Sequence[Message]) -> str:
    """The content of the last ``user`` message (text parts joined), or "" when there is none."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return content_text(m.get("content"))
    return ""


def content_text(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; return its text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type", "text") == "text")
    return str(content)


@dataclass(frozen=True)
class RouteDecision:
    """Which expert answers a request, and why.

    Args:
        expert: the chosen expert's name, or ``None`` for the bare base model.
        source: ``explicit`` (the request named it), ``rule`` (a pre- or post-router rule fired),
            ``router`` (the classifier's top pick passed the threshold) or ``fallback``
            (the top score was below the threshold).
        score: the router's probability for ``expert`` when a router ran, else ``None``.
        reason: one human-readable sentence (names the rule, or the score and threshold).
        scores: per-expert probabilities, when a router ran.
        rule: the name of the rule that fired, if any.
    """

    expert: str | None
    source: RouteSource
    score: float | None = None
    reason: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)
    rule: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "expert": self.expert,
            "source": self.source,
            "score": None if self.score is None else round(float(self.score), 6),
            "reason": self.reason,
            "scores": {k: round(float(v), 6) for k, v in self.scores.items()},
        }


# A temperature or top_p below this means "the most likely token" (vLLM's _SAMPLING_EPS): below
# float32's range such values become 0, so 1/temperature overflows the logits and a nucleus drops
# every token. The engine's sampler treats them as greedy; the pipeline maps them to
# temperature 0 before any backend (a remote engine included) sees them.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings. ``None`` fields take the expert's / engine's default.

    Args:
        max_tokens: new tokens at most.
        temperature: 0 means greedy.
        top_p: nucleus sampling mass in (0, 1].
        top_k: keep the k most likely tokens; 0 or None disables.
        seed: per-request RNG seed; the same seed gives the same tokens whatever else is batched.
        stop: stop strings; the text stops before the first occurrence.
        stop_token_ids: extra token ids that end generation (EOS always does).
    """

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def merged_over(self, defaults: "SamplingParams") -> "SamplingParams":
        """These params, with every unset field taken from ``defaults``."""
        return SamplingParams(
            max_tokens=self.max_tokens if self.max_tokens is not None else defaults.max_tokens,
            temperature=self.temperature if self.temperature is not None else defaults.temperature,
            top_p=self.top_p if self.top_p is not None else defaults.top_p,
            top_k=self.top_k if self.top_k is not None else defaults.top_k,
            seed=self.seed if self.seed is not None else defaults.seed,
            stop=self.stop or defaults.stop,
            stop_token_ids=self.stop_token_ids or defaults.stop_token_ids,
        )
