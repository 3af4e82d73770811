"""Helpers for the routing tests: small configs built in code and a deterministic fake router.

Imported as a plain module (pytest puts this test dir on sys.path; there are no test packages)."""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np
from coe.config import CoeConfig, config_from_dict
from routers.base import RouterInfo

SQL = [
    "How many customers signed up in March?",
    "List the employees whose salary is above 50000 from the staff table.",
    "Write a SQL query that returns the top 5 products by sales.",
    "Count the rows in the invoices table grouped by status.",
    "Join the authors and books tables and count books per author.",
    "Select every order placed after January 1st from the orders table.",
]
JSON = [
    "Extract name and age as JSON: Maria Lopez, 34.",
    "Turn this into JSON with keys product and price: the kettle costs 39 euros.",
    "Give me a JSON object with sender and subject of this email: From Tom, 'Quarterly report'.",
    "Parse this address into JSON fields street and city: 221B Baker Street, London.",
    "Return JSON {title, author} for: Dune was written by Frank Herbert.",
    "Convert to JSON: Order 4412 shipped to Anna Berg with 3 items.",
]
MATH = [
    "Tom has 12 apples and gives away 5. How many are left?",
    "A train goes 60 km per hour for 3 hours. How far does it travel?",
    "What is 17 times 23?",
    "If a shirt costs $25 with a 20% discount, what is the new price?",
    "A rectangle is 8 m by 5 m. What is its area?",
    "Lisa saves $15 a week. How many weeks to reach $180?",
]
GENERAL = [
    "Hi there, how are you today?",
    "Tell me a fun fact about octopuses.",
    "Write a short poem about autumn.",
    "Who painted the Mona Lisa?",
]


# The training set every router test fits (experts in an order that is NOT sorted, so a head's
# sorted classes_ differ from it), and messages none of them saw, with their experts.
TEXTS = SQL + JSON + MATH + GENERAL
LABELS = ["sql"] * len(SQL) + ["json"] * len(JSON) + ["math"] * len(MATH) + ["general"] * len(GENERAL)
HELD_OUT = {
    "Which customers placed more than ten orders? Use the orders table.": "sql",
    "Extract the city and zip code as JSON: 10 Main St, Springfield 49007.": "json",
    "A box holds 24 eggs. How many eggs are in 7 boxes?": "math",
    "Good morning! Any plans for the weekend?": "general",
}


def base_dict(**router: Any) -> dict[str, Any]:
    """A valid config dict: sql/json/math with examples, general as the fallback."""
    return {
        "version": 1,
        "router": {"type": "setfit", "threshold": 0.5, "fallback": "general", "seed": 7, **router},
        "experts": [
            {"name": "sql", "description": "SQL", "examples": list(SQL)},
            {"name": "json", "description": "JSON", "examples": list(JSON)},
            {"name": "math", "description": "math", "examples": list(MATH)},
            {"name": "general", "description": "chit-chat", "examples": list(GENERAL)},
        ],
        "rules": [],
    }


def make_config(data: Mapping[str, Any] | None = None, *, source_path: str | None = None, **router: Any) -> CoeConfig:
    return config_from_dict(copy.deepcopy(dict(data)) if data is not None else base_dict(**router), source_path=source_path)


class LookupRouter:
    """Deterministic fake router: per-text probabilities from a lookup table, uniform otherwise.

    Counts ``predict_proba`` calls so tests can assert batching.
    """

    def __init__(self, experts: Sequence[str], table: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self.info = RouterInfo(kind="lookup", experts=tuple(experts))
        self.table = dict(table or {})
        self.calls: list[list[str]] = []

    @property
    def experts(self) -> tuple[str, ...]:
        return self.info.experts

    def fit(self, texts, labels, topics=None):  # pragma: no cover - not trained in tests
        return self

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.full((len(texts), len(self.experts)), 1.0 / len(self.experts))
        for i, t in enumerate(texts):
            if t in self.table:
                out[i] = [self.table[t].get(e, 0.0) for e in self.experts]
        return out

    def save(self, path: str) -> None:  # pragma: no cover
        raise NotImplementedError
