"""The rule layer: each matcher, their combination, unless, order, and the post-router stage."""

from __future__ import annotations

import pytest

from coe.types import RouteContext, RouteDecision
from routers.rules import RuleSet

from routing_helpers import base_dict, make_config


def rules_config(rules):
    data = base_dict()
    data["rules"] = rules
    return make_config(data)


def ruleset(*rules):
    return RuleSet.from_config(rules_config(list(rules)))


def pre(when, unless=None, name="r", expert="sql"):
    rule = {"name": name, "expert": expert, "when": when}
    if unless is not None:
        rule["unless"] = unless
    return rule


# (when, text, metadata, fires?)
MATCHER_CASES = [
    # regex: re.search, case-sensitive unless (?i)
    ({"regex": r"\bSELECT\b"}, "run SELECT 1", {}, True),
    ({"regex": r"\bSELECT\b"}, "run select 1", {}, False),
    ({"regex": r"(?i)\bselect\b"}, "run select 1", {}, True),
    # keywords: whole word, case-insensitive, any by default
    ({"keywords": ["table"]}, "Which TABLE holds users?", {}, True),
    ({"keywords": ["table"]}, "the tables are full", {}, False),
    ({"keywords": ["table"]}, "a timetable", {}, False),
    ({"keywords": ["select"]}, "natural selection", {}, False),
    ({"keywords": ["order by"]}, "sort it ORDER   BY date", {}, True),
    ({"keywords": ["c++"]}, "a question about C++ templates", {}, True),
    ({"keywords": ["c++"]}, "a question about c templates", {}, False),
    ({"keywords": {"any": ["sql", "query"]}}, "write a query", {}, True),
    ({"keywords": {"all": ["sql", "query"]}}, "write a query", {}, False),
    ({"keywords": {"all": ["sql", "query"]}}, "write an SQL query", {}, True),
    ({"keywords": {"any": ["json"], "all": ["name", "age"]}}, "json with name and age", {}, True),
    ({"keywords": {"any": ["json"], "all": ["name", "age"]}}, "json with name only", {}, False),
    # metadata: equality, a list is any-of, a missing key never matches, numbers compare as strings
    ({"metadata": {"tenant": "acme"}}, "hi", {"tenant": "acme"}, True),
    ({"metadata": {"tenant": "acme"}}, "hi", {"tenant": "globex"}, False),
    ({"metadata": {"tenant": "acme"}}, "hi", {}, False),
    ({"metadata": {"tenant": ["acme", "globex"]}}, "hi", {"tenant": "globex"}, True),
    ({"metadata": {"tier": 2}}, "hi", {"tier": "2"}, True),
    ({"metadata": {"tenant": "acme", "user": "bo"}}, "hi", {"tenant": "acme", "user": "al"}, False),
    # length bounds, in characters, inclusive
    ({"min_length": 5}, "abcd", {}, False),
    ({"min_length": 5}, "abcde", {}, True),
    ({"max_length": 5}, "abcde", {}, True),
    ({"max_length": 5}, "abcdef", {}, False),
    # combined: every condition must hold
    ({"keywords": ["table"], "metadata": {"tenant": "acme"}}, "a table", {"tenant": "acme"}, True),
    ({"keywords": ["table"], "metadata": {"tenant": "acme"}}, "a table", {"tenant": "x"}, False),
    ({"keywords": ["table"], "max_length": 6}, "a table", {}, False),
]


@pytest.mark.parametrize(("when", "text", "metadata", "fires"), MATCHER_CASES)
def test_matchers(when, text, metadata, fires):
    d = ruleset(pre(when)).match_pre(RouteContext(text=text, metadata=metadata))
    assert (d is not None) == fires
    if fires:
        assert d.expert == "sql" and d.source == "rule" and d.rule == "r"


def test_unless_blocks_the_rule():
    rs = ruleset(pre({"keywords": ["table"]}, unless={"keywords": ["furniture", "wooden"]}))
    assert rs.match_pre(RouteContext(text="join the users table")) is not None
    assert rs.match_pre(RouteContext(text="a wooden table for the kitchen")) is None


def test_unless_needs_all_of_its_conditions():
    rs = ruleset(pre({"keywords": ["table"]}, unless={"keywords": ["wooden"], "metadata": {"tenant": "shop"}}))
    assert rs.match_pre(RouteContext(text="a wooden table")) is not None
    assert rs.match_pre(RouteContext(text="a wooden table", metadata={"tenant": "shop"})) is None


def test_first_matching_rule_wins_in_declaration_order():
    rs = ruleset(
        pre({"metadata": {"tenant": "acme"}}, name="tenant-acme", expert="math"),
        pre({"keywords": ["table"]}, name="tables", expert="sql"),
        pre({"keywords": ["json"]}, name="json-word", expert="json"),
    )
    both = RouteContext(text="a table as json", metadata={"tenant": "acme"})
    assert rs.match_pre(both).rule == "tenant-acme"
    assert rs.match_pre(RouteContext(text="a table as json")).rule == "tables"
    assert rs.match_pre(RouteContext(text="as json")).rule == "json-word"
    assert rs.match_pre(RouteContext(text="nothing here")) is None


def test_reason_names_the_rule_and_what_matched():
    d = ruleset(pre({"keywords": ["table"], "metadata": {"tenant": "acme"}}, name="acme-tables")).match_pre(
        RouteContext(text="the users Table", metadata={"tenant": "acme"})
    )
    assert "'acme-tables'" in d.reason and "'sql'" in d.reason
    assert "tenant=acme" in d.reason and "'Table'" in d.reason
    assert d.reason.endswith(".")


def routed(expert, scores, source="router"):
    return RouteDecision(expert=expert, source=source, score=scores.get(expert), scores=scores)


def post(when, unless=None, name="p", expert="general"):
    rule = {"name": name, "expert": expert, "stage": "post", "when": when}
    if unless is not None:
        rule["unless"] = unless
    return rule


POST_CASES = [
    # (when, unless, routed expert, scores, text, metadata, fires?)
    ({"routed": ["sql"], "score_below": 0.6}, None, "sql", {"sql": 0.55, "general": 0.45}, "hi", {}, True),
    ({"routed": ["sql"], "score_below": 0.6}, None, "sql", {"sql": 0.6, "general": 0.4}, "hi", {}, False),
    ({"routed": ["sql"], "score_below": 0.6}, None, "math", {"math": 0.55, "general": 0.45}, "hi", {}, False),
    ({"score_above": 0.9}, None, "math", {"math": 0.95, "general": 0.05}, "hi", {}, True),
    ({"score_above": 0.9}, None, "math", {"math": 0.85, "general": 0.15}, "hi", {}, False),
    # "routed to sql with a weak score and no table-like words -> general"
    ({"routed": ["sql"], "score_below": 0.6}, {"keywords": ["table", "query"]}, "sql", {"sql": 0.5, "general": 0.5},
     "what is a good table game", {}, False),
    ({"routed": ["sql"], "score_below": 0.6}, {"keywords": ["table", "query"]}, "sql", {"sql": 0.5, "general": 0.5},
     "what is a good board game", {}, True),
    # "tenant acme may not use math"
    ({"routed": ["math"], "metadata": {"tenant": "acme"}}, None, "math", {"math": 0.99, "general": 0.01}, "2+2", {"tenant": "acme"}, True),
    ({"routed": ["math"], "metadata": {"tenant": "acme"}}, None, "math", {"math": 0.99, "general": 0.01}, "2+2", {"tenant": "zen"}, False),
]


@pytest.mark.parametrize(("when", "unless", "expert", "scores", "text", "metadata", "fires"), POST_CASES)
def test_post_rules(when, unless, expert, scores, text, metadata, fires):
    rs = ruleset(post(when, unless))
    d = rs.match_post(RouteContext(text=text, metadata=metadata), routed(expert, scores))
    assert (d is not None) == fires
    if fires:
        assert d.expert == "general" and d.source == "rule" and d.rule == "p"
        assert d.scores == scores  # the router's scores are kept
        assert d.score == scores.get("general")
        assert "'p'" in d.reason and repr(expert) in d.reason


def test_post_score_conditions_use_the_top_score_even_after_a_fallback():
    rs = ruleset(post({"score_below": 0.4}, expert="math"))
    fell_back = RouteDecision(expert="general", source="fallback", score=0.1, scores={"sql": 0.35, "general": 0.1})
    d = rs.match_post(RouteContext(text="x"), fell_back)
    assert d is not None and "0.35 < 0.4" in d.reason and "fallback 'general'" in d.reason


def test_post_score_conditions_never_hold_without_router_scores():
    rs = ruleset(post({"score_below": 0.9}))
    assert rs.match_post(RouteContext(text="x"), RouteDecision(expert="sql", source="fallback")) is None


def test_stages_are_separate():
    rs = ruleset(pre({"keywords": ["table"]}, name="pre-t"), post({"keywords": ["table"]}, name="post-t"))
    assert len(rs) == 2
    assert rs.match_pre(RouteContext(text="a table")).rule == "pre-t"
    assert rs.match_post(RouteContext(text="a table"), routed("math", {"math": 1.0})).rule == "post-t"


def test_default_experts_yaml_rules_work(tmp_path):
    from pathlib import Path

    from coe.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "experts.yaml")
    rs = RuleSet.from_config(cfg)
    assert rs.match_pre(RouteContext(text="Fix this: SELECT name FROM users WHERE id = 3")).expert == "sql"
    assert rs.match_pre(RouteContext(text="How many users signed up?")) is None
