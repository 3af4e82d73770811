"""The Router protocol: what every learned router (SetFit, centroid, logreg, ...) provides.

A router maps texts to a probability per expert. It knows nothing about rules, thresholds
or fallbacks: the decision chain (``routers/chain.py``) applies those on top, so every router
is compared on equal terms by the evaluation harness.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class RouterInfo:
    """What a saved router was trained on; checked against the config at load.

    Args:
        kind: router type (``setfit``, ``centroid``, ...).
        experts: the expert names, in the column order of ``predict_proba``.
        body: the embedding body it was trained with.
        seed: training seed.
        n_train: training rows.
        extra: anything else worth recording (hyper-parameters, timings).
    """

    kind: str
    experts: tuple[str, ...]
    body: str = ""
    seed: int = 0
    n_train: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Router(Protocol):
    """A text -> per-expert probability model.

    ``experts`` is the column order of ``predict_proba``: always expert names, mapped
    explicitly from the underlying classifier's ``classes_`` (never assumed to follow the
    order labels were given in).
    """

    info: RouterInfo

    @property
    def experts(self) -> tuple[str, ...]: ...

    def fit(self, texts: Sequence[str], labels: Sequence[str], topics: Sequence[str | None] | None = None) -> "Router":
        """Train on ``texts`` with expert-name ``labels`` (and optional per-row topic labels)."""
        ...

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``[len(texts), len(self.experts)]`` probabilities; each row sums to 1."""
        ...

    def save(self, path: str) -> None: ...


INFO_FILE = "router.json"
"""Every saved router dir has this file: its ``RouterInfo``, so loading knows the kind."""


def save_info(path: str | os.PathLike[str], info: RouterInfo) -> None:
    """Write ``info`` as ``<path>/router.json`` (creating ``path``)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    data = dataclasses.asdict(info)
    data["experts"] = list(info.experts)
    (p / INFO_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_info(path: str | os.PathLike[str]) -> RouterInfo:
    """Read ``<path>/router.json``.

    Raises:
        FileNotFoundError: there is no ``router.json`` in ``path``.
        ValueError: the file is not a valid RouterInfo.
    """
    f = Path(path) / INFO_FILE
    data = json.loads(f.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or not isinstance(data.get("experts"), list):
        raise ValueError(f"{f}: expected an object with a string 'kind' and a list 'experts'")
    known = {fl.name for fl in dataclasses.fields(RouterInfo)}
    data = {k: v for k, v in data.items() if k in known}
    data["experts"] = tuple(str(e) for e in data["experts"])
    return RouterInfo(**data)
