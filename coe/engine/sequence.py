"""One running generation: its prompt progress, new tokens, text, and why it ended.

The scheduler owns the sequences; a sequence only knows how to hand out its next prompt chunk or
decode token and how to take a sampled token (EOS, stop tokens, stop strings, max_tokens and the
context limit end it). Its text comes from a :class:`~coe.engine.detokenize.Detokenizer`.

This module knows nothing about threads, queues or the model.
"""

from __future__ import annotations

import time
from typing import Any

from coe.engine.batch import Decode, Prefill
from coe.engine.detokenize import Detokenizer
from coe.engine.outputs import GenerationOutput
from coe.engine.request import Request
from coe.engine.sampling import Sampler


class Sequence:
    """A request being generated.

    Args:
        request: the validated request.
        tokenizer: for incremental detokenization.
        max_seq_len: the context limit.
        incremental: detokenize token by token (streams, stop strings); otherwise the text is
            decoded once at the end, which saves two tokenizer calls per token.
    """

    def __init__(self, request: Request, tokenizer: Any, max_seq_len: int, *, incremental: bool = True) -> None:
        self.request = request
        self.prompt_ids = request.prompt_ids
        self.max_seq_len = max_seq_len
        self.sampler = Sampler(request.temperature, request.top_p, request.top_k, request.seed)
        self.detok = Detokenizer(tokenizer, request.prompt_ids, request.stop)
        self.incremental = incremental or bool(request.stop)
        self.out_ids: list[int] = []
        self.num_prefilled = 0
        self.kv_slot = -1
        self.lora_slot = -1
        self.lease: Any = None  # the registry's pin on the adapter
        self.finish_reason: str | None = None
        self.text_parts: list[str] = []
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.first_token: float | None = None

    @property
    def prefilling(self) -> bool:
        return self.num_prefilled < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_prefill(self, budget: int) -> Prefill:
        """The next prompt chunk of at most ``budget`` tokens."""
        start = self.num_prefilled
        n = min(budget, len(self.prompt_ids) - start)
        self.num_prefilled = start + n
        return Prefill(self.kv_slot, start, self.prompt_ids[start : start + n], self.lora_slot, self.num_prefilled == len(self.prompt_ids))

    def decode_item(self) -> Decode:
        """The decode token of the next step (the last sampled token, at its position)."""
        return Decode(self.kv_slot, len(self.prompt_ids) + len(self.out_ids) - 1, self.out_ids[-1], self.lora_slot)

    def append(self, token: int) -> str:
        """Take a sampled token; returns the text delta it releases (sets ``finish_reason`` when done)."""
        if self.first_token is None:
            self.first_token = time.monotonic()
        self.out_ids.append(token)
        req = self.request
        if not self.incremental:
            stop = token in req.stop_token_ids
            if stop or len(self.out_ids) >= req.max_tokens or len(self.prompt_ids) + len(self.out_ids) >= self.max_seq_len:
                self.finish_reason = "stop" if stop else "length"
                text = self.detok.decode_all(self.out_ids[:-1] if stop else self.out_ids)
                if text:
                    self.text_parts.append(text)
            return ""
        if token in req.stop_token_ids:
            self.finish_reason = "stop"
            delta = self.detok.flush()
        else:
            delta = self.detok.add(token)
            if self.detok.stopped:
                self.finish_reason = "stop"
            elif len(self.out_ids) >= req.max_tokens or len(self.prompt_ids) + len(self.out_ids) >= self.max_seq_len:
                self.finish_reason = "length"
                delta += self.detok.flush()
        if delta:
            self.text_parts.append(delta)
        return delta

    def output(self) -> GenerationOutput:
        """The final result (call once finished)."""
        now = time.monotonic()
        return GenerationOutput(
            text="".join(self.text_parts),
            token_ids=list(self.out_ids),
            finish_reason=self.finish_reason or "length",  # type: ignore[arg-type]
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.out_ids),
            adapter=self.request.adapter,
            queue_s=(self.started or now) - self.submitted,
            ttft_s=(self.first_token or now) - self.submitted,
            total_s=now - self.submitted,
        )
