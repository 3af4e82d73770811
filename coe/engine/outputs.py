"""What the engine hands back: finished generations, stream deltas, adapter descriptions.

Plain frozen dataclasses, free of torch, so the pipeline and server can use them without
importing anything heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class GenerationOutput:
    """A finished generation (also the last item of a stream).

    Args:
        text: the generated text (a stop string, and anything after it, is cut off).
        token_ids: the new tokens only (an EOS or stop token that ended generation included).
        finish_reason: ``stop`` (EOS, a stop token or a stop string) or ``length`` (max_tokens or
            the context limit).
        prompt_tokens: tokens in the prompt (chat template applied).
        completion_tokens: ``len(token_ids)``.
        adapter: the adapter that generated it (``None``: the base model).
        queue_s: seconds waited before the first step (queue and adapter loading).
        ttft_s: seconds from submission to the first new token.
        total_s: seconds from submission to the end.
    """

    text: str
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None = None
    queue_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class StreamDelta:
    """A piece of a streamed generation: new text (possibly empty while a multi-byte character or
    a possible stop string is incomplete) and the token ids it came from."""

    text: str
    token_ids: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class AdapterInfo:
    """One registered adapter.

    Args:
        name: its registry name (the expert's name, for adapters from experts.yaml).
        source: the folder or hub id it is read from.
        location: ``device`` (in a slot of the LoRA stacks), ``cpu`` (read and packed in CPU
            memory) or ``disk`` (registered, not read yet).
        bytes: bytes of its packed weights (0 while on disk).
        pinned: a running request uses it, so it cannot be evicted.
        in_flight: how many running requests use it.
        rank: its largest module rank (``None`` while on disk).
    """

    name: str
    source: str
    location: Literal["device", "cpu", "disk"]
    bytes: int
    pinned: bool
    in_flight: int
    rank: int | None
