"""A deterministic keyword router and a minimal decision chain, standing in for routers/ in harness tests."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from coe.types import RouteContext, RouteDecision
from routers.base import RouterInfo


class KeywordRouter:
    """Learns, per expert, the words of its training texts; scores = smoothed word-overlap shares.

    Deterministic and instant, so harness tests check plumbing and numbers, not a model.
    """

    def __init__(self, kind: str = "keyword", seed: int = 0) -> None:
        self.info = RouterInfo(kind=kind, experts=(), seed=seed)
        self.vocab: dict[str, set[str]] = {}

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(sorted(self.vocab))

    def fit(self, texts: Sequence[str], labels: Sequence[str], topics: Sequence[str | None] | None = None) -> "KeywordRouter":
        for text, label in zip(texts, labels, strict=True):
            self.vocab.setdefault(label, set()).update(_words(text))
        self.info = RouterInfo(kind=self.info.kind, experts=self.experts, seed=self.info.seed, n_train=len(texts))
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        hits = np.array([[len(_words(t) & self.vocab[e]) for e in self.experts] for t in texts], dtype=float)
        scores = np.exp(2.0 * hits)
        return scores / scores.sum(axis=1, keepdims=True)

    def save(self, path: str) -> None:  # pragma: no cover - not used by the harness
        raise NotImplementedError


class TinyChain:
    """Pre-rule ``metadata``-free keyword rule 'hello' -> fallback, then router >= threshold, else fallback."""

    def __init__(self, cfg, router) -> None:
        self.cfg, self.router = cfg, router

    def decide(self, ctx: RouteContext) -> RouteDecision:
        return self.decide_batch([ctx])[0]

    def decide_batch(self, ctxs: Sequence[RouteContext]) -> list[RouteDecision]:
        fallback = self.cfg.router.fallback
        proba = self.router.predict_proba([c.text for c in ctxs])
        out = []
        for ctx, p in zip(ctxs, proba):
            if "hello" in _words(ctx.text):
                out.append(RouteDecision(expert=fallback, source="rule", rule="greeting"))
                continue
            j = int(p.argmax())
            scores = dict(zip(self.router.experts, map(float, p)))
            expert = self.router.experts[j]
            if expert == fallback or p[j] < self.cfg.router.threshold:
                out.append(RouteDecision(expert=fallback, source="fallback", score=float(p[j]), scores=scores))
            else:
                out.append(RouteDecision(expert=expert, source="router", score=float(p[j]), scores=scores))
        return out


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))
