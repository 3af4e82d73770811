"""Checks a generation request and tokenizes it, on the caller's thread, before it is queued.

Every problem is a typed ``CoeError`` raised synchronously (``InvalidRequest`` naming the
parameter, ``ContextTooLong`` naming the limit), so a bad request never reaches the step loop.

Prompt rules: a raw ``prompt`` is tokenized as ``tokenizer(prompt)`` does by default (special
tokens such as BOS included); ``messages`` go through the tokenizer's chat template with the
generation prompt, and the rendered text is tokenized without adding special tokens again.

``max_tokens``: an explicit value must fit the context with the prompt (else ``ContextTooLong``);
an unset one defaults to ``serving.max_tokens_default``, shortened to what the context leaves.

This module knows nothing about the model or the scheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from coe.errors import ContextTooLong, InvalidRequest

MAX_STOP_STRINGS = 16


@dataclass
class Request:
    """A validated, tokenized request.

    Args:
        prompt_ids: the prompt's token ids.
        adapter: adapter name, None for the base model.
        max_tokens: new tokens at most.
        temperature / top_p / top_k / seed: sampling (temperature 0 = greedy).
        stop: stop strings.
        stop_token_ids: token ids that end generation, EOS ids included.
        timeout_s: seconds from submission until the request is cancelled.
    """

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    timeout_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def encode_prompt(tokenizer: Any, prompt: Any = None, messages: Any = None) -> list[int]:
    """Token ids of a raw prompt or of a chat (template applied, generation prompt added)."""
    if (prompt is None) == (messages is None):
        raise InvalidRequest("give exactly one of `prompt` (raw text) or `messages` (a chat)", param="prompt" if prompt is not None else "messages")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt: expected a string, found {type(prompt).__name__}", param="prompt")
        ids = list(tokenizer(prompt)["input_ids"])
    else:
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
            raise InvalidRequest("messages: expected a non-empty list of {role, content} objects", param="messages")
        for i, m in enumerate(messages):
            if not hasattr(m, "get") or not isinstance(m.get("role"), str):
                raise InvalidRequest(f"messages[{i}]: expected an object with a string `role` and `content`", param=f"messages[{i}]")
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequest("messages: the base model's tokenizer has no chat template; send a raw `prompt` instead", param="messages")
        try:
            text = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises TemplateError and friends for unsupported roles etc.
            raise InvalidRequest(f"messages: the chat template rejected them: {exc}", param="messages") from exc
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise InvalidRequest("prompt: it tokenizes to zero tokens; give some text", param="prompt" if prompt is not None else "messages")
    return ids


def _number(name: str, v: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidRequest(f"{name}: expected a number, found {v!r}", param=name)
    if (v <= lo if lo_open else v < lo) or v > hi:
        bounds = f"{'>' if lo_open else '>='} {lo} and <= {hi}"
        raise InvalidRequest(f"{name}: {v!r} is out of range; expected {bounds}", param=name)
    return float(v)


def _int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{name}: expected an integer, found {v!r}", param=name)
    return v


def build_request(
    prompt_ids: list[int],
    *,
    adapter: str | None,
    max_tokens: Any,
    temperature: Any,
    top_p: Any,
    top_k: Any,
    seed: Any,
    stop: Any,
    stop_token_ids: Any,
    timeout: Any,
    max_seq_len: int,
    max_tokens_default: int,
    max_tokens_limit: int,
    default_timeout_s: float,
    eos_ids: Sequence[int],
    vocab_size: int,
) -> Request:
    """Validate the generation parameters against the engine's limits (see the module docstring)."""
    n = len(prompt_ids)
    if n >= max_seq_len:
        raise ContextTooLong(
            f"prompt: {n} tokens do not fit the context of {max_seq_len} tokens (serving.max_seq_len, capped at the "
            "model's context) with room for at least one new token; shorten the prompt",
            param="prompt",
        )
    if max_tokens is None:
        max_tokens = min(max_tokens_default, max_seq_len - n)
    else:
        max_tokens = _int("max_tokens", max_tokens)
        if max_tokens < 1 or max_tokens > max_tokens_limit:
            raise InvalidRequest(f"max_tokens: {max_tokens} is out of range; expected 1 to {max_tokens_limit} (serving.max_tokens_limit)", param="max_tokens")
        if n + max_tokens > max_seq_len:
            raise ContextTooLong(
                f"max_tokens: the prompt's {n} tokens plus max_tokens={max_tokens} exceed the context of {max_seq_len} tokens; "
                f"ask for at most {max_seq_len - n} new tokens or shorten the prompt",
                param="max_tokens",
            )
    temp = 0.0 if temperature is None else _number("temperature", temperature, 0.0, 2.0)
    tp = 1.0 if top_p is None else _number("top_p", top_p, 0.0, 1.0, lo_open=True)
    tk = 0 if top_k is None else _int("top_k", top_k)
    if tk < 0:
        raise InvalidRequest(f"top_k: {tk} is out of range; expected 0 (disabled) or a positive integer", param="top_k")
    if seed is not None:
        seed = _int("seed", seed) % (1 << 63)
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, Sequence) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidRequest(f"stop: expected a string or a list of strings, found {stop!r}", param="stop")
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise InvalidRequest(f"stop: expected at most {MAX_STOP_STRINGS} non-empty strings, found {list(stops)!r}", param="stop")
    ids = set(int(i) for i in eos_ids)
    for i, t in enumerate(stop_token_ids or ()):
        t = _int(f"stop_token_ids[{i}]", t)
        if not 0 <= t < vocab_size:
            raise InvalidRequest(f"stop_token_ids[{i}]: {t} is not a token id; expected 0 to {vocab_size - 1}", param="stop_token_ids")
        ids.add(t)
    timeout_s = default_timeout_s if timeout is None else _number("timeout", timeout, 0.0, float("inf"), lo_open=True)
    if adapter is not None and not isinstance(adapter, str):
        raise InvalidRequest(f"adapter: expected an adapter name or None, found {adapter!r}", param="adapter")
    return Request(prompt_ids=list(prompt_ids), adapter=adapter, max_tokens=max_tokens, temperature=temp, top_p=tp,
                   top_k=tk, seed=seed, stop=stops, stop_token_ids=frozenset(ids), timeout_s=timeout_s)
