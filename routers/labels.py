"""Class labels of the learned routers, and the explicit class -> expert column map.

A router may train on finer classes than experts: with topics, an expert ``math`` that has
topics ``percent`` and ``geometry`` trains as classes ``math::percent`` and ``math::geometry``,
and its probability is the sum of theirs. Classifier heads order their probability columns by
their own ``classes_`` (sorted, for scikit-learn), not by the order labels were given in
(setfit issues 462 and 587), so every router maps columns to experts through ``expert_columns``
from the head's actual class order, never by position.

Pure numpy; knows nothing about models.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TOPIC_SEP = "::"
"""Separates expert and topic in a class label; cannot occur in an expert name."""


def class_label(expert: str, topic: str | None, use_topics: bool = True) -> str:
    """The training class of a row: the expert, or ``expert::topic`` when topics are used."""
    return f"{expert}{TOPIC_SEP}{topic}" if (topic and use_topics) else expert


def expert_of(label: str) -> str:
    """The expert a class label belongs to."""
    return label.split(TOPIC_SEP, 1)[0]


def ordered_unique(items: Sequence[str]) -> tuple[str, ...]:
    """``items`` without repeats, in first-seen order."""
    return tuple(dict.fromkeys(items))


def expert_columns(head_classes: Sequence[str], experts: Sequence[str]) -> np.ndarray:
    """A ``[n_classes, n_experts]`` 0/1 matrix: ``head_proba @ M`` gives per-expert probabilities.

    Args:
        head_classes: the class of each probability column, in the head's own order
            (e.g. ``LogisticRegression.classes_``).
        experts: the expert names, in the router's column order.

    Raises:
        ValueError: a head class belongs to no listed expert (the saved head and its
            metadata disagree).
    """
    index = {e: j for j, e in enumerate(experts)}
    m = np.zeros((len(head_classes), len(experts)), dtype=np.float64)
    for i, c in enumerate(head_classes):
        e = expert_of(str(c))
        if e not in index:
            raise ValueError(f"classifier class {c!r} belongs to no known expert (experts: {', '.join(experts)})")
        m[i, index[e]] = 1.0
    return m


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)
