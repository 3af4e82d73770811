"""The rule layer: ordered, programmatic routing rules from experts.yaml, compiled once.

A rule routes to its ``expert`` when every condition of its ``when`` holds and its ``unless``
(if any) does not. Rules are tried in the order they are declared, per stage, and the first
match wins:

- ``pre`` rules run before the router and see the text and the request metadata;
- ``post`` rules run after the router (or the fallback) and may also look at the expert it
  chose (``routed``) and its top probability (``score_below`` / ``score_above``).

Conditions: ``regex`` (``re.search`` on the routed text), ``keywords`` (whole-word,
case-insensitive, ``any`` and/or ``all``), ``metadata`` equality (a list means any of),
``min_length`` / ``max_length`` in characters.

This module knows the rule schema (``coe.config``) and ``RouteDecision``; it knows nothing
about how the router computes its scores, nor about thresholds or fallbacks.

Example:
    >>> rules = RuleSet.from_config(cfg)
    >>> rules.match_pre(RouteContext(text="SELECT * FROM users"))
    RouteDecision(expert='sql', source='rule', ..., rule='sql-statement')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from coe.config import CoeConfig, MatchConfig, RuleConfig
from coe.types import RouteContext, RouteDecision


def keyword_pattern(keyword: str) -> str:
    """A regex for ``keyword`` as a whole word (or phrase): not inside a longer word.

    Inner whitespace matches any run of whitespace, so ``"order by"`` also finds
    ``"ORDER  BY"``. The lookarounds (rather than ``\\b``) keep keywords that start or end
    with punctuation, such as ``"c++"`` or ``".json"``, matchable.
    """
    parts = [re.escape(p) for p in keyword.split()]
    return r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)"


@dataclass(frozen=True)
class CompiledMatch:
    """One ``when``/``unless`` block, with its regexes compiled.

    Use ``CompiledMatch.compile(match_config)``; ``holds`` then tests a message.
    """

    regex: re.Pattern[str] | None
    any_keywords: re.Pattern[str] | None
    all_keywords: tuple[tuple[str, re.Pattern[str]], ...]
    metadata: Mapping[str, frozenset[str]]
    min_length: int | None
    max_length: int | None
    routed: frozenset[str]
    score_below: float | None
    score_above: float | None

    @classmethod
    def compile(cls, m: MatchConfig) -> "CompiledMatch":
        any_kw = m.keywords.any if m.keywords else ()
        all_kw = m.keywords.all if m.keywords else ()
        return cls(
            regex=re.compile(m.regex) if m.regex is not None else None,
            any_keywords=re.compile("|".join(keyword_pattern(k) for k in any_kw), re.IGNORECASE) if any_kw else None,
            all_keywords=tuple((k, re.compile(keyword_pattern(k), re.IGNORECASE)) for k in all_kw),
            metadata={k: frozenset(str(v) for v in vals) for k, vals in m.metadata.items()},
            min_length=m.min_length,
            max_length=m.max_length,
            routed=frozenset(m.routed),
            score_below=m.score_below,
            score_above=m.score_above,
        )

    def holds(self, ctx: RouteContext, routed: RouteDecision | None = None) -> list[str] | None:
        """Whether every condition holds for ``ctx`` (and the router's pick ``routed``).

        Returns:
            ``None`` when some condition fails; otherwise a short description of each
            condition that held (used to build the decision's reason).
        """
        text = ctx.text
        why: list[str] = []
        if self.min_length is not None or self.max_length is not None:
            n = len(text)
            if self.min_length is not None and n < self.min_length:
                return None
            if self.max_length is not None and n > self.max_length:
                return None
            why.append(f"length {n}")
        for key, allowed in self.metadata.items():
            value = ctx.metadata.get(key)
            if value is None or str(value) not in allowed:
                return None
            why.append(f"{key}={value}")
        if self.any_keywords is not None:
            found = self.any_keywords.search(text)
            if found is None:
                return None
            why.append(f"keyword {found.group(0)!r}")
        for keyword, pattern in self.all_keywords:
            if pattern.search(text) is None:
                return None
        if self.all_keywords:
            why.append("keywords " + ", ".join(repr(k) for k, _ in self.all_keywords))
        if self.regex is not None:
            found = self.regex.search(text)
            if found is None:
                return None
            why.append(f"regex matched {_clip(found.group(0))!r}")
        if self.routed or self.score_below is not None or self.score_above is not None:
            if routed is None:
                return None  # a router-stage condition can't hold before the router ran
            if self.routed:
                if routed.expert not in self.routed:
                    return None
                why.append(f"routed to {routed.expert}")
            top = top_score(routed)
            if self.score_below is not None:
                if top is None or not top < self.score_below:
                    return None
                why.append(f"score {top:.2f} < {self.score_below:g}")
            if self.score_above is not None:
                if top is None or not top >= self.score_above:
                    return None
                why.append(f"score {top:.2f} >= {self.score_above:g}")
        return why


@dataclass(frozen=True)
class CompiledRule:
    """A rule with its ``when`` and ``unless`` compiled."""

    name: str
    expert: str
    stage: str
    when: CompiledMatch
    unless: CompiledMatch | None

    @classmethod
    def compile(cls, rule: RuleConfig) -> "CompiledRule":
        return cls(
            name=rule.name,
            expert=rule.expert,
            stage=rule.stage,
            when=CompiledMatch.compile(rule.when),
            unless=CompiledMatch.compile(rule.unless) if rule.unless is not None else None,
        )

    def fires(self, ctx: RouteContext, routed: RouteDecision | None = None) -> list[str] | None:
        """The conditions that held when the rule fires, else ``None``."""
        why = self.when.holds(ctx, routed)
        if why is None:
            return None
        if self.unless is not None and self.unless.holds(ctx, routed) is not None:
            return None
        return why


class RuleSet:
    """The config's rules, compiled once, split into the pre- and post-router stages.

    Args:
        rules: the rules in declaration order (stages mixed; order is kept per stage).

    Example:
        >>> rules = RuleSet.from_config(cfg)
        >>> rules.match_pre(RouteContext(text="hi", metadata={"tenant": "acme"}))
    """

    def __init__(self, rules: Sequence[RuleConfig]) -> None:
        compiled = [CompiledRule.compile(r) for r in rules]
        self.pre: tuple[CompiledRule, ...] = tuple(r for r in compiled if r.stage == "pre")
        self.post: tuple[CompiledRule, ...] = tuple(r for r in compiled if r.stage == "post")

    @classmethod
    def from_config(cls, cfg: CoeConfig) -> "RuleSet":
        """Compile ``cfg.rules`` (already validated by the config loader)."""
        return cls(cfg.rules)

    def __len__(self) -> int:
        return len(self.pre) + len(self.post)

    def match_pre(self, ctx: RouteContext) -> RouteDecision | None:
        """The decision of the first pre-router rule that fires, or ``None``."""
        for rule in self.pre:
            why = rule.fires(ctx)
            if why is not None:
                return RouteDecision(
                    expert=rule.expert,
                    source="rule",
                    reason=f"rule {rule.name!r} routed to {rule.expert!r} ({'; '.join(why)}).",
                    rule=rule.name,
                )
        return None

    def match_post(self, ctx: RouteContext, routed: RouteDecision) -> RouteDecision | None:
        """The decision of the first post-router rule that fires on ``routed``, or ``None``.

        Args:
            ctx: the request.
            routed: the decision the router (or the fallback) made; its ``expert`` is what
                ``routed`` conditions see and its top probability what ``score_*`` compare.

        Returns:
            A ``source="rule"`` decision that keeps the router's per-expert scores, or
            ``None`` when no post rule fires.
        """
        for rule in self.post:
            why = rule.fires(ctx, routed)
            if why is not None:
                return RouteDecision(
                    expert=rule.expert,
                    source="rule",
                    score=routed.scores.get(rule.expert) if routed.scores else None,
                    reason=(
                        f"post-router rule {rule.name!r} overrode the {_PICKED_BY.get(routed.source, routed.source)} "
                        f"{routed.expert!r} with {rule.expert!r} ({'; '.join(why)})."
                    ),
                    scores=routed.scores,
                    rule=rule.name,
                )
        return None


_PICKED_BY = {"router": "router's pick", "fallback": "fallback"}


def top_score(decision: RouteDecision) -> float | None:
    """The router's top probability behind ``decision`` (``None`` when no router ran)."""
    if decision.scores:
        return max(decision.scores.values())
    return decision.score


def _clip(s: str, n: int = 40) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."
