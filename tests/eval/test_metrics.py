"""eval.metrics on hand-made predictions whose answers are worked out by hand."""

import numpy as np
import pytest

from eval import metrics

FB = "oos"
EXPERTS = ["a", "b"]


def test_routing_metrics_known_answers():
    # 4 in-scope rows (3 a, 1 b) and 2 out-of-scope rows.
    y_true = ["a", "a", "a", "b", "oos", "oos"]
    y_pred = ["a", "a", "b", "oos", "oos", "a"]
    m = metrics.routing_metrics(y_true, y_pred, FB, experts=EXPERTS)
    assert m["accuracy"] == pytest.approx(3 / 6)
    # a: P = 2/3 (3 predicted a, 2 right), R = 2/3; b: P = 0, R = 0; oos: P = 1/2, R = 1/2.
    assert m["per_expert"]["a"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_expert"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_expert"]["oos"]["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 0.5) / 3)
    assert m["oos_recall"] == pytest.approx(1 / 2)
    assert m["oos_precision"] == pytest.approx(1 / 2)  # two rows sent to the fallback, one out of scope
    assert m["in_scope_acceptance"] == pytest.approx(3 / 4)  # the b row went to the fallback


def test_routing_metrics_empty_denominators_are_none():
    m = metrics.routing_metrics(["a", "b"], ["a", "a"], FB, experts=EXPERTS)
    assert m["oos_recall"] is None and m["oos_precision"] is None
    assert m["in_scope_acceptance"] == 1.0
    assert m["per_expert"]["b"]["support"] == 1


def test_routing_metrics_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="equal length"):
        metrics.routing_metrics(["a"], ["a", "b"], FB)


def test_route_with_threshold_global_own_and_fallback_column():
    experts = ["a", "b", "oos"]
    proba = np.array([
        [0.8, 0.1, 0.1],  # a, above 0.5
        [0.45, 0.35, 0.2],  # a, below 0.5 -> fallback
        [0.1, 0.6, 0.3],  # b, own threshold 0.7 -> fallback
        [0.1, 0.2, 0.7],  # the fallback column wins -> fallback whatever the threshold
    ])
    got = metrics.route_with_threshold(proba, experts, "oos", 0.5, {"b": 0.7})
    assert got.tolist() == ["a", "oos", "oos", "oos"]
    assert metrics.route_with_threshold(proba, experts, "oos", 0.0).tolist() == ["a", "a", "b", "oos"]


def test_route_with_threshold_checks_shape():
    with pytest.raises(ValueError, match="one column per expert"):
        metrics.route_with_threshold(np.ones((2, 3)) / 3, EXPERTS, FB, 0.5)


def test_in_scope_accuracy_ignores_threshold_and_fallback_column():
    experts = ["a", "oos", "b"]
    proba = np.array([
        [0.3, 0.6, 0.1],  # fallback column on top, but a beats b -> a (right)
        [0.1, 0.5, 0.4],  # b (wrong, truth a)
        [0.2, 0.1, 0.7],  # b (right)
        [0.9, 0.05, 0.05],  # out of scope: not counted
    ])
    acc = metrics.in_scope_accuracy(proba, experts, ["a", "a", "b", "oos"], "oos")
    assert acc == pytest.approx(2 / 3)
    assert metrics.in_scope_accuracy(proba[3:], experts, ["oos"], "oos") is None


def test_calibrate_threshold_picks_highest_threshold_meeting_acceptance():
    # In-scope top scores 0.9, 0.8, 0.7, 0.6 (all pick a); OOS scores 0.75, 0.5.
    proba = np.array([[s, 1 - s] for s in (0.9, 0.8, 0.7, 0.6, 0.75, 0.5)])
    y = ["a", "a", "a", "a", "oos", "oos"]
    cal = metrics.calibrate_threshold(proba, EXPERTS, y, FB, min_acceptance=0.75)
    # 3 of 4 in-scope rows must pass: midway between 0.7 and 0.6.
    assert cal.threshold == pytest.approx(0.65)
    assert cal.feasible
    assert cal.in_scope_acceptance == pytest.approx(0.75)
    assert cal.oos_recall == pytest.approx(0.5)  # 0.5 rejected, 0.75 accepted
    # Asking for every in-scope row: midway between the lowest in-scope score and 0.
    assert metrics.calibrate_threshold(proba, EXPERTS, y, FB, min_acceptance=1.0).threshold == pytest.approx(0.3)
    # A stricter budget never gives a lower threshold, so OOS recall never drops.
    ts = [metrics.calibrate_threshold(proba, EXPERTS, y, FB, a).threshold for a in (0.25, 0.5, 0.75, 1.0)]
    assert ts == sorted(ts, reverse=True)


def test_calibrate_threshold_counts_own_thresholds_and_infeasible_budgets():
    experts = ["a", "b", "oos"]
    proba = np.array([
        [0.9, 0.05, 0.05],  # a
        [0.6, 0.3, 0.1],  # a
        [0.1, 0.8, 0.1],  # b, own threshold 0.5: always accepted
        [0.1, 0.1, 0.8],  # fallback column: never accepted
    ])
    y = ["a", "a", "b", "a"]
    cal = metrics.calibrate_threshold(proba, experts, y, "oos", min_acceptance=0.75, expert_thresholds={"b": 0.5})
    # 3 of 4 must pass; b's row passes on its own, so 2 of the free rows (0.9, 0.6) must: below 0.6.
    assert cal.threshold == pytest.approx(0.3)
    assert cal.in_scope_acceptance == pytest.approx(0.75)
    cal = metrics.calibrate_threshold(proba, experts, y, "oos", min_acceptance=1.0, expert_thresholds={"b": 0.5})
    assert not cal.feasible and cal.threshold == 0.0
    with pytest.raises(ValueError, match="in-scope"):
        metrics.calibrate_threshold(proba[:1], experts, ["oos"], "oos")
    with pytest.raises(ValueError, match="min_acceptance"):
        metrics.calibrate_threshold(proba, experts, y, "oos", min_acceptance=0.0)


def test_threshold_sweep_is_monotone_and_matches_routing_metrics():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet([1, 1, 1], size=200)
    experts = ["a", "b", "c"]
    y = rng.choice(["a", "b", "c", "oos"], size=200).tolist()
    s = metrics.threshold_sweep(proba, experts, y, FB)
    assert s["threshold"][0] == 0.0 and s["threshold"][-1] == 1.0 and len(s["threshold"]) == 101
    assert all(x >= y_ for x, y_ in zip(s["in_scope_acceptance"], s["in_scope_acceptance"][1:]))
    assert all(x <= y_ for x, y_ in zip(s["oos_recall"], s["oos_recall"][1:]))
    m = metrics.routing_metrics(y, metrics.route_with_threshold(proba, experts, FB, 0.4), FB)
    i = s["threshold"].index(0.4)
    assert s["accuracy"][i] == pytest.approx(m["accuracy"])
    assert s["oos_recall"][i] == pytest.approx(m["oos_recall"])


def test_decision_stats_counts_sources_and_rule_precision():
    d = metrics.decision_stats(
        sources=["rule", "rule", "router", "fallback", "rule"],
        rules=["sql-kw", "sql-kw", None, None, "tenant"],
        y_true=["sql", "json", "json", "oos", "math"],
        y_pred=["sql", "sql", "json", "oos", "math"],
    )
    assert d["by_source"] == {"rule": 3, "router": 1, "fallback": 1}
    assert d["rules"]["sql-kw"] == {"count": 2, "correct": 1, "precision": 0.5}
    assert d["rules"]["tenant"]["precision"] == 1.0


def test_confusion_and_latency_summary():
    c = metrics.confusion(["a", "b", "b"], ["a", "a", "b"], ["a", "b", "oos"])
    assert c["matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    lat = metrics.latency_summary([0.001] * 19 + [0.1])
    assert lat["p50"] == pytest.approx(1.0)
    assert lat["p95"] > 1.0
    with pytest.raises(ValueError):
        metrics.latency_summary([])
