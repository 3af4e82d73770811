"""Next-token choice for a step's logits: greedy, temperature, top-k, top-p, per-request seeds.

Each sampled request owns a ``torch.Generator`` seeded from its ``seed`` and draws exactly one
number per token from it, so its tokens do not depend on what else shares the batch. Greedy rows
(temperature 0) are one batched ``argmax``; sampled rows are handled one by one (their filters
differ per request, and there are rarely many).

This module knows nothing about requests beyond their sampling settings.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from coe.types import SAMPLING_EPS


@dataclass
class Sampler:
    """One request's sampling settings and RNG.

    Args:
        temperature: 0 (or below ``SAMPLING_EPS``) means greedy.
        top_p: nucleus mass in (0, 1]; 1 disables; below ``SAMPLING_EPS`` means greedy.
        top_k: keep the k most likely tokens; 0 disables.
        seed: RNG seed; None draws a fresh one.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_p < SAMPLING_EPS or self.top_k == 1

    def sample(self, logits: torch.Tensor) -> int:
        """One token from float32 logits [V]."""
        if self.greedy:
            return int(logits.argmax())
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[0]:
            kth = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= self.top_p
            drop[0] = False
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample_batch(logits: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """Next tokens for logits [N, V] (row i uses ``samplers[i]``)."""
    if all(s.greedy for s in samplers):
        return logits.argmax(dim=-1).tolist()
    out = []
    greedy = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(samplers):
        out.append(greedy[i] if s.greedy else s.sample(logits[i]))
    return out
