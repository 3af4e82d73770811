"""The decision chain: which expert answers a message, and why. All of routing policy is here.

    1. explicit pick   the request's ``model`` names an expert (or the base model)  -> "explicit"
    2. pre rules       the first pre-router rule that fires                          -> "rule"
    3. router          top probability >= its threshold                              -> "router"
                       below it: the fallback expert                                 -> "fallback"
    4. post rules      the first post-router rule that fires on step 3's pick        -> "rule"

A threshold is the expert's own ``threshold`` if set, else ``router.threshold``
(semantic-router's per-route thresholds with a global default). "No route matched" is not an
error: it is the fallback decision. Without a router (``router.type: none``, or none
trained) step 3 is the fallback. Without a configured fallback, a low score keeps the top
expert and the reason says so.

Knows the config, the rules and the Router protocol; knows nothing about how a router
scores, nor about generation.
"""

from __future__ import annotations

import difflib
from typing import Sequence

import numpy as np

from coe.config import CoeConfig
from coe.errors import UnknownModel
from coe.types import RouteContext, RouteDecision
from routers.base import Router
from routers.rules import RuleSet

AUTO = "auto"


class DecisionChain:
    """Explicit pick -> pre rules -> router (threshold, fallback) -> post rules.

    Args:
        config: the loaded config (experts, rules, ``router.threshold``/``fallback``).
        router: a trained router, or ``None`` (rules and fallback only).

    Example:
        >>> chain = DecisionChain(cfg, router=load_router(None, cfg))
        >>> chain.decide(RouteContext(text="How many users signed up in May?")).expert
        'sql'
    """

    def __init__(self, config: CoeConfig, router: Router | None = None) -> None:
        self.config = config
        self.router = router
        self.rules = RuleSet.from_config(config)
        self.fallback = config.router.fallback
        self.base_id = config.base_model.served_id
        self._experts = frozenset(config.expert_names)
        self._thresholds = {e.name: e.threshold for e in config.experts if e.threshold is not None}

    def threshold(self, expert: str) -> float:
        """The threshold the router's score for ``expert`` must reach."""
        return self._thresholds.get(expert, self.config.router.threshold)

    def decide(self, ctx: RouteContext) -> RouteDecision:
        """The decision for one request.

        Raises:
            UnknownModel: ``ctx.model`` is neither ``auto``, an expert, nor the base model id.
        """
        return self.decide_batch([ctx])[0]

    def decide_batch(self, ctxs: Sequence[RouteContext]) -> list[RouteDecision]:
        """Decisions for many requests, with one ``predict_proba`` call for all that reach the router.

        Raises:
            UnknownModel: some ``ctx.model`` is unknown (checked before any routing work).
        """
        decisions: list[RouteDecision | None] = [self._explicit(c) for c in ctxs]
        for i, c in enumerate(ctxs):
            if decisions[i] is None:
                decisions[i] = self.rules.match_pre(c)
        pending = [i for i, d in enumerate(decisions) if d is None]
        to_score = [i for i in pending if self.router is not None and ctxs[i].text.strip()]
        if to_score:
            assert self.router is not None
            proba = np.asarray(self.router.predict_proba([ctxs[i].text for i in to_score]))
            experts = tuple(self.router.experts)
            for row, i in enumerate(to_score):
                decisions[i] = self._from_scores(dict(zip(experts, map(float, proba[row]))))
        for i in pending:
            routed = decisions[i] or self._no_router(ctxs[i])
            decisions[i] = self.rules.match_post(ctxs[i], routed) or routed
        return [d for d in decisions if d is not None]

    # ------------------------------------------------------------------ steps

    def _explicit(self, ctx: RouteContext) -> RouteDecision | None:
        model = ctx.model
        if model is None or model == AUTO:
            return None
        if model in self._experts:
            return RouteDecision(expert=model, source="explicit", reason=f"the request named expert {model!r}.")
        if model == self.base_id:
            return RouteDecision(expert=None, source="explicit", reason=f"the request named the base model {model!r}.")
        close = difflib.get_close_matches(model, [*self.config.expert_names, self.base_id], n=1, cutoff=0.6)
        raise UnknownModel(
            f"model: {model!r} is not a model served here; expected {AUTO!r} (route automatically), "
            f"an expert ({', '.join(self.config.expert_names)}) or the base model {self.base_id!r}"
            + (f"; did you mean {close[0]!r}?" if close else ""),
            param="model",
        )

    def _from_scores(self, scores: dict[str, float]) -> RouteDecision:
        top = max(scores, key=scores.__getitem__)
        score, threshold = scores[top], self.threshold(top)
        if score >= threshold:
            return RouteDecision(
                expert=top, source="router", score=score, scores=scores,
                reason=f"router picked {top!r} with score {score:.2f} >= threshold {threshold:.2f}.",
            )
        if self.fallback is None:
            return RouteDecision(
                expert=top, source="fallback", score=score, scores=scores,
                reason=(
                    f"router's top pick {top!r} scored {score:.2f} < threshold {threshold:.2f}, but no "
                    f"router.fallback is configured, so {top!r} answers anyway."
                ),
            )
        return RouteDecision(
            expert=self.fallback, source="fallback", score=scores.get(self.fallback), scores=scores,
            reason=(
                f"router's top pick {top!r} scored {score:.2f} < threshold {threshold:.2f}; "
                f"fallback {self.fallback!r} answers."
            ),
        )

    def _no_router(self, ctx: RouteContext) -> RouteDecision:
        """The decision when the router cannot run: no router, or nothing to route on."""
        if self.router is not None:
            why = "the message has no text to route"
        elif self.config.router.type == "none":
            why = "router.type is none"
        else:
            why = "no trained router is loaded"
        if self.fallback is None:
            return RouteDecision(
                expert=None, source="fallback",
                reason=f"{why} and no router.fallback is configured; the base model answers.",
            )
        return RouteDecision(expert=self.fallback, source="fallback", reason=f"{why}; fallback {self.fallback!r} answers.")
