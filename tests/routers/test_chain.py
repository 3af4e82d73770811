"""The decision chain, table-driven over a deterministic lookup router.

explicit pick -> pre rules -> router >= threshold (else fallback) -> post rules.
"""

from __future__ import annotations

import pytest

from coe.errors import UnknownModel
from coe.types import RouteContext
from routers import DecisionChain
from routing_helpers import LookupRouter, base_dict, make_config

EXPERTS = ("sql", "json", "math", "general")
TABLE = {
    "count the users": {"sql": 0.9, "json": 0.05, "math": 0.03, "general": 0.02},
    "weak sql guess": {"sql": 0.55, "json": 0.15, "math": 0.15, "general": 0.15},
    "weak sql about a table": {"sql": 0.55, "json": 0.15, "math": 0.15, "general": 0.15},
    "unsure": {"sql": 0.2, "json": 0.3, "math": 0.25, "general": 0.25},
    "math at 0.45": {"sql": 0.2, "json": 0.2, "math": 0.45, "general": 0.15},
    "json at 0.7": {"sql": 0.1, "json": 0.7, "math": 0.1, "general": 0.1},
    "2+2 please": {"sql": 0.0, "json": 0.0, "math": 0.97, "general": 0.03},
}


def chain_config(fallback="general", threshold=0.5, expert_thresholds=None, base_id=None):
    data = base_dict(fallback=fallback, threshold=threshold)
    if fallback is None:
        del data["router"]["fallback"]
    for e in data["experts"]:
        if expert_thresholds and e["name"] in expert_thresholds:
            e["threshold"] = expert_thresholds[e["name"]]
    if base_id:
        data["base_model"] = {"id": base_id}
    data["rules"] = [
        {"name": "sql-statement", "expert": "sql", "when": {"regex": r"(?i)\bselect\b.+\bfrom\b"}},
        {"name": "acme-math", "expert": "math", "when": {"metadata": {"tenant": "acme"}, "keywords": ["sum"]}},
        {"name": "weak-sql", "stage": "post", "expert": "general",
         "when": {"routed": ["sql"], "score_below": 0.6}, "unless": {"keywords": ["table"]}},
        {"name": "no-math-for-zen", "stage": "post", "expert": "general",
         "when": {"routed": ["math"], "metadata": {"tenant": "zen"}}},
    ]
    return make_config(data)


def chain(**kw):
    return DecisionChain(chain_config(**kw), router=LookupRouter(EXPERTS, TABLE))


# (chain kwargs, text, model, metadata, expert, source, rule)
CASES = [
    # 1. explicit pick outranks everything, including rules
    ({}, "select a from b", "json", {}, "json", "explicit", None),
    ({}, "count the users", "smollm2-135m-instruct", {}, None, "explicit", None),
    ({"base_id": "tiny-base"}, "count the users", "tiny-base", {}, None, "explicit", None),
    # "auto" and no model both route
    ({}, "count the users", "auto", {}, "sql", "router", None),
    ({}, "count the users", None, {}, "sql", "router", None),
    # 2. pre rules outrank the router
    ({}, "please SELECT name FROM users", None, {}, "sql", "rule", "sql-statement"),
    ({}, "json at 0.7", None, {}, "json", "router", None),
    ({}, "sum these", None, {"tenant": "acme"}, "math", "rule", "acme-math"),
    ({}, "sum these", None, {"tenant": "other"}, "general", "fallback", None),  # uniform scores 0.25 < 0.5
    # 3. router vs threshold, fallback below it
    ({}, "unsure", None, {}, "general", "fallback", None),
    ({"threshold": 0.25}, "unsure", None, {}, "json", "router", None),
    # per-expert thresholds win over router.threshold, both ways
    ({"expert_thresholds": {"math": 0.4}}, "math at 0.45", None, {}, "math", "router", None),
    ({"expert_thresholds": {"json": 0.8}}, "json at 0.7", None, {}, "general", "fallback", None),
    # no fallback configured: the top expert anyway
    ({"fallback": None}, "unsure", None, {}, "json", "fallback", None),
    # 4. post rules override the router's pick
    ({}, "weak sql guess", None, {}, "general", "rule", "weak-sql"),
    ({}, "weak sql about a table", None, {}, "sql", "router", None),  # `unless` keeps the pick
    ({}, "2+2 please", None, {"tenant": "zen"}, "general", "rule", "no-math-for-zen"),
    ({}, "2+2 please", None, {"tenant": "acme"}, "math", "router", None),
    # post rules don't touch explicit or pre-rule decisions
    ({}, "2+2 please", "math", {"tenant": "zen"}, "math", "explicit", None),
]


@pytest.mark.parametrize(("kw", "text", "model", "metadata", "expert", "source", "rule"), CASES)
def test_chain(kw, text, model, metadata, expert, source, rule):
    d = chain(**kw).decide(RouteContext(text=text, model=model, metadata=metadata))
    assert (d.expert, d.source, d.rule) == (expert, source, rule)
    assert d.reason and d.reason.endswith(".")
    if rule:
        assert repr(rule) in d.reason
    if source in ("router", "fallback") or (source == "rule" and rule in ("weak-sql", "no-math-for-zen")):
        assert set(d.scores) == set(EXPERTS)  # the router ran: per-expert scores are carried
        assert d.score == pytest.approx(d.scores.get(d.expert)) if d.expert in d.scores else d.score is None
    else:
        assert d.scores == {}


def test_reasons_name_score_and_threshold():
    c = chain()
    hit = c.decide(RouteContext(text="count the users"))
    assert hit.reason == "router picked 'sql' with score 0.90 >= threshold 0.50."
    low = c.decide(RouteContext(text="unsure"))
    assert "'json' scored 0.30 < threshold 0.50" in low.reason and "fallback 'general'" in low.reason
    no_fb = chain(fallback=None).decide(RouteContext(text="unsure"))
    assert "no router.fallback is configured" in no_fb.reason and no_fb.score == pytest.approx(0.3)


def test_unknown_model_names_it_and_lists_the_choices():
    with pytest.raises(UnknownModel) as exc:
        chain().decide(RouteContext(text="hi", model="sqll"))
    msg = str(exc.value)
    for part in ("'sqll'", "did you mean 'sql'", "'auto'", "sql, json, math, general", "'smollm2-135m-instruct'"):
        assert part in msg
    assert exc.value.param == "model"


def test_without_a_router_messages_go_to_the_fallback():
    c = DecisionChain(chain_config(), router=None)
    d = c.decide(RouteContext(text="count the users"))
    assert (d.expert, d.source, d.scores) == ("general", "fallback", {})
    assert "no trained router" in d.reason
    assert c.decide(RouteContext(text="select x from y")).rule == "sql-statement"  # rules still apply
    assert c.decide(RouteContext(text="hi", metadata={"tenant": "zen"})).expert == "general"


def test_router_type_none_without_fallback_is_the_base_model():
    data = base_dict(type="none")
    del data["router"]["fallback"]
    d = DecisionChain(make_config(data), router=None).decide(RouteContext(text="anything"))
    assert (d.expert, d.source) == (None, "fallback")
    assert "router.type is none" in d.reason and "base model" in d.reason


def test_empty_text_skips_the_router():
    c = chain()
    d = c.decide(RouteContext(text="   "))
    assert (d.expert, d.source) == ("general", "fallback") and "no text" in d.reason
    assert c.router.calls == []


def test_decide_batch_calls_the_router_once_and_matches_decide():
    texts = ["count the users", "select a from b", "unsure", "weak sql guess", "", "2+2 please"]
    ctxs = [RouteContext(text=t, metadata={"tenant": "zen"}) for t in texts]
    c = chain()
    batch = c.decide_batch(ctxs)
    assert c.router.calls == [["count the users", "unsure", "weak sql guess", "2+2 please"]]
    assert batch == [chain().decide(x) for x in ctxs]
    assert [d.expert for d in batch] == ["sql", "sql", "general", "general", "general", "general"]
    assert [d.source for d in batch] == ["router", "rule", "fallback", "rule", "fallback", "rule"]


def test_decide_batch_with_explicit_and_empty_batches():
    c = chain()
    assert c.decide_batch([]) == []
    assert [d.source for d in c.decide_batch([RouteContext(text="x", model="sql")])] == ["explicit"]
    assert c.router.calls == []
