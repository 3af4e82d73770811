"""Routing metrics: what a router got right, with "no expert fits" counted as an answer.

Every function works on plain arrays: expert-name labels (``y_true``, ``y_pred``) and, for the
threshold-dependent numbers, a router's probability matrix ``proba [N, len(experts)]`` whose
column order is ``experts``. The fallback expert is one more class: an out-of-scope row (label
== fallback) is right only when it is routed to the fallback.

Thresholding follows the decision chain: the top column is the pick; a pick whose probability
is below its threshold (the expert's own, else the global one) goes to the fallback, and a
pick that *is* the fallback column (a router trained with out-of-scope examples) is always the
fallback.

Deliberately knows nothing about routers, configs, rules or files (``eval/harness.py`` does).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def route_with_threshold(
    proba: np.ndarray,
    experts: Sequence[str],
    fallback: str,
    threshold: float,
    expert_thresholds: Mapping[str, float] | None = None,
) -> np.ndarray:
    """The expert each row goes to once the threshold is applied.

    Args:
        proba: ``[N, len(experts)]`` router probabilities.
        experts: column names of ``proba``.
        fallback: the expert that low-confidence rows go to.
        threshold: global threshold; a top probability below it goes to ``fallback``.
        expert_thresholds: per-expert thresholds that replace the global one for that pick.

    Returns:
        ``[N]`` array of expert names.

    Example:
        >>> route_with_threshold(np.array([[0.9, 0.1], [0.6, 0.4]]), ["a", "b"], "oos", 0.7)
        array(['a', 'oos'], dtype='<U3')
    """
    names = np.asarray(list(experts) + [fallback])
    top = proba.argmax(axis=1)
    accepted = _accepted(proba, experts, fallback, threshold, expert_thresholds)
    return np.where(accepted, names[top], fallback)


def in_scope_accuracy(proba: np.ndarray, experts: Sequence[str], y_true: Sequence[str], fallback: str) -> float | None:
    """Accuracy of the argmax over the non-fallback experts on the in-scope rows, ignoring the threshold.

    Returns:
        The accuracy, or ``None`` when no row is in scope.
    """
    y = np.asarray(y_true)
    inside = y != fallback
    if not inside.any():
        return None
    cols = [j for j, e in enumerate(experts) if e != fallback]
    picks = np.asarray(experts)[cols][proba[:, cols].argmax(axis=1)]
    return float((picks[inside] == y[inside]).mean())


def routing_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], fallback: str, experts: Sequence[str] = ()
) -> dict[str, Any]:
    """Accuracy, macro-F1, per-expert P/R/F1, and the out-of-scope numbers of final decisions.

    Args:
        y_true: the right expert per row (``fallback`` for out-of-scope rows).
        y_pred: the expert each row was routed to.
        fallback: the fallback expert's name.
        experts: experts to list in ``per_expert`` even when they have no support.

    Returns:
        ``accuracy`` (the fallback counted as a class); ``macro_f1`` (over the classes that occur
        in ``y_true`` or ``y_pred``); ``per_expert`` {name: {precision, recall, f1, support}};
        ``oos_recall`` (out-of-scope rows sent to the fallback); ``oos_precision`` (rows sent to
        the fallback that are out of scope); ``in_scope_acceptance`` (in-scope rows not sent to
        the fallback). A ratio with an empty denominator is ``None``.
    """
    y, p = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D of equal length, got {y.shape} and {p.shape}")
    if not len(y):
        raise ValueError("no rows to score")
    present = sorted(set(y) | set(p))
    listed = list(dict.fromkeys([*experts, *present]))
    prec, rec, f1, support = precision_recall_fscore_support(y, p, labels=listed, zero_division=0)
    oos, to_fallback = y == fallback, p == fallback
    return {
        "accuracy": float((y == p).mean()),
        "macro_f1": float(f1_score(y, p, labels=present, average="macro", zero_division=0)),
        "per_expert": {
            name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(listed)
        },
        "oos_recall": _ratio(int((to_fallback & oos).sum()), int(oos.sum())),
        "oos_precision": _ratio(int((to_fallback & oos).sum()), int(to_fallback.sum())),
        "in_scope_acceptance": _ratio(int((~to_fallback & ~oos).sum()), int((~oos).sum())),
    }


def confusion(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Confusion matrix (rows: true, columns: predicted) as JSON-ready lists."""
    m = confusion_matrix(np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object), labels=list(labels))
    return {"labels": list(labels), "matrix": m.tolist()}


def threshold_sweep(
    proba: np.ndarray,
    experts: Sequence[str],
    y_true: Sequence[str],
    fallback: str,
    thresholds: Sequence[float] | None = None,
    expert_thresholds: Mapping[str, float] | None = None,
) -> dict[str, list[float | None]]:
    """How acceptance, OOS recall/precision and accuracy move as the global threshold sweeps.

    Args:
        proba, experts, fallback, expert_thresholds: as in ``route_with_threshold``.
        y_true: the right expert per row.
        thresholds: the global thresholds to try (default: 0.00, 0.01, ..., 1.00).

    Returns:
        Parallel lists ``threshold``, ``in_scope_acceptance``, ``oos_recall``, ``oos_precision``,
        ``accuracy`` (``None`` where a ratio has an empty denominator).
    """
    ts = np.round(np.linspace(0.0, 1.0, 101), 2) if thresholds is None else np.asarray(thresholds, dtype=float)
    out: dict[str, list[float | None]] = {k: [] for k in ("threshold", "in_scope_acceptance", "oos_recall", "oos_precision", "accuracy")}
    for t in ts:
        m = routing_metrics(y_true, route_with_threshold(proba, experts, fallback, float(t), expert_thresholds), fallback)
        out["threshold"].append(float(t))
        for k in ("in_scope_acceptance", "oos_recall", "oos_precision", "accuracy"):
            out[k].append(m[k])
    return out


@dataclass(frozen=True)
class Calibration:
    """A threshold chosen on validation rows, and what it gave there.

    Args:
        threshold: the chosen global threshold.
        criterion: how it was chosen, in words.
        min_acceptance: the in-scope acceptance it had to keep.
        feasible: ``False`` when even threshold 0 keeps fewer in-scope rows than asked (the
            router itself sends them to the fallback column); the threshold is then 0.
        in_scope_acceptance: acceptance at ``threshold`` on the calibration rows.
        oos_recall: OOS recall at ``threshold`` on the calibration rows (``None`` without OOS rows).
        n_rows: calibration rows.
    """

    threshold: float
    criterion: str
    min_acceptance: float
    feasible: bool
    in_scope_acceptance: float | None
    oos_recall: float | None
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_threshold(
    proba: np.ndarray,
    experts: Sequence[str],
    y_true: Sequence[str],
    fallback: str,
    min_acceptance: float = 0.95,
    expert_thresholds: Mapping[str, float] | None = None,
) -> Calibration:
    """Choose the global threshold: the highest one that keeps ``min_acceptance`` of in-scope rows.

    Raising the threshold can only send more rows to the fallback, so OOS recall never falls
    and in-scope acceptance never rises as it grows. The highest threshold whose in-scope
    acceptance is still >= ``min_acceptance`` therefore gives the best OOS recall that the
    acceptance budget allows. It is placed halfway between the k-th and (k+1)-th highest
    in-scope top score (k = the rows that must be kept), not on a score, so that a row whose
    score is recomputed with float noise does not flip. Picks with their own per-expert
    threshold are unaffected by the global one and are counted as they fall.

    Args:
        proba, experts, fallback, expert_thresholds: as in ``route_with_threshold``.
        y_true: the right expert per row; rows labelled ``fallback`` are out of scope.
        min_acceptance: the share of in-scope rows that must reach an expert, in (0, 1].

    Returns:
        The ``Calibration``.

    Raises:
        ValueError: ``min_acceptance`` is out of range, or there is no in-scope row.

    Example:
        >>> p = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
        >>> calibrate_threshold(p, ["a", "b"], ["a", "a", "a", "oos"], "oos", 2 / 3).threshold
        0.7
    """
    if not 0.0 < min_acceptance <= 1.0:
        raise ValueError(f"min_acceptance: {min_acceptance!r} is out of range; expected a value in (0, 1]")
    y = np.asarray(y_true)
    inside = y != fallback
    n_in = int(inside.sum())
    if n_in == 0:
        raise ValueError("cannot calibrate a threshold without in-scope rows")
    own = _own_thresholds(proba, experts, expert_thresholds)
    eligible = _eligible(proba, experts, fallback) & inside
    needed = math.ceil(min_acceptance * n_in - 1e-9)
    fixed = eligible & ~np.isnan(own)
    needed -= int((fixed & (proba.max(axis=1) >= np.nan_to_num(own))).sum())
    free_scores = np.sort(proba.max(axis=1)[eligible & np.isnan(own)])[::-1]
    feasible = needed <= len(free_scores)
    if needed <= 0:
        threshold = 1.0
    elif not feasible:
        threshold = 0.0
    else:
        below = float(free_scores[needed]) if needed < len(free_scores) else 0.0
        threshold = (float(free_scores[needed - 1]) + below) / 2.0
    pred = route_with_threshold(proba, experts, fallback, threshold, expert_thresholds)
    m = routing_metrics(y, pred, fallback)
    return Calibration(
        threshold=threshold,
        criterion=(
            f"highest global threshold keeping in-scope acceptance >= {min_acceptance:g} on the calibration rows "
            "(maximises OOS recall under that budget); placed midway between neighbouring in-scope scores"
        ),
        min_acceptance=min_acceptance,
        feasible=feasible,
        in_scope_acceptance=m["in_scope_acceptance"],
        oos_recall=m["oos_recall"],
        n_rows=len(y),
    )


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """``{"p50", "p95", "mean"}`` in milliseconds of per-call wall times given in seconds."""
    if not len(seconds):
        raise ValueError("no latency samples")
    ms = np.asarray(seconds, dtype=float) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "mean": float(ms.mean())}


def decision_stats(
    sources: Sequence[str], rules: Sequence[str | None], y_true: Sequence[str], y_pred: Sequence[str]
) -> dict[str, Any]:
    """Where decisions came from, and how precise each rule was.

    Args:
        sources: each decision's source (``explicit``, ``rule``, ``router``, ``fallback``).
        rules: the rule that fired per decision, or ``None``.
        y_true, y_pred: right and chosen expert per row.

    Returns:
        ``{"by_source": {source: count}, "rules": {name: {"count", "correct", "precision"}}}``;
        a rule's precision is the share of its decisions that chose the right expert.
    """
    by_source: dict[str, int] = {}
    per_rule: dict[str, dict[str, Any]] = {}
    for src, rule, t, p in zip(sources, rules, y_true, y_pred, strict=True):
        by_source[src] = by_source.get(src, 0) + 1
        if rule is not None:
            r = per_rule.setdefault(rule, {"count": 0, "correct": 0})
            r["count"] += 1
            r["correct"] += int(t == p)
    for r in per_rule.values():
        r["precision"] = r["correct"] / r["count"]
    return {"by_source": by_source, "rules": per_rule}


# --------------------------------------------------------------------------- helpers


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _eligible(proba: np.ndarray, experts: Sequence[str], fallback: str) -> np.ndarray:
    """Rows whose top column is an expert other than the fallback."""
    top = np.asarray(experts)[proba.argmax(axis=1)]
    return top != fallback


def _own_thresholds(proba: np.ndarray, experts: Sequence[str], expert_thresholds: Mapping[str, float] | None) -> np.ndarray:
    """Per-row threshold of the top pick's own, NaN where the global one applies."""
    per_col = np.array([(expert_thresholds or {}).get(e, np.nan) for e in experts], dtype=float)
    return per_col[proba.argmax(axis=1)]


def _accepted(
    proba: np.ndarray, experts: Sequence[str], fallback: str, threshold: float, expert_thresholds: Mapping[str, float] | None
) -> np.ndarray:
    if proba.ndim != 2 or proba.shape[1] != len(experts):
        raise ValueError(f"proba has shape {proba.shape}; expected [N, {len(experts)}] (one column per expert)")
    own = _own_thresholds(proba, experts, expert_thresholds)
    limit = np.where(np.isnan(own), threshold, own)
    return _eligible(proba, experts, fallback) & (proba.max(axis=1) >= limit)
