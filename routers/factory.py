"""Build, train, save and load routers from a ``CoeConfig``.

- ``make_router(kind, config, seed)``: an untrained router of a kind (``contrastive``, ``setfit``,
  ``centroid``, ``logreg``, ``knn``), parameterized by ``config.router`` (body, training).
- ``training_rows(config, extra_rows)``: the rows a router learns from.
- ``train_router(config, ...)``: make, fit, save (atomically) to ``router.path``.
- ``load_router(path, config)``: load whatever kind ``router.json`` says, and refuse a router
  trained for a different set of experts than the config declares.

Knows the config and the router classes; knows nothing about rules, thresholds or the CLI.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from coe.config import CoeConfig
from coe.errors import ConfigError, RouterError
from routers.base import INFO_FILE, Router, RouterInfo, read_info
from routers.baselines import CentroidRouter, KnnRouter, LogRegRouter
from routers.contrastive_router import ContrastiveRouter
from routers.embeddings import body_spec
from routers.setfit_router import SetFitRouter

logger = logging.getLogger(__name__)

ROUTER_CLASSES: dict[str, Any] = {
    "contrastive": ContrastiveRouter,
    "setfit": SetFitRouter,
    "centroid": CentroidRouter,
    "logreg": LogRegRouter,
    "knn": KnnRouter,
}
"""Router kind -> class with ``(body, training, seed)`` constructor and a ``load(path, info)`` classmethod.
Classes that learn from the fallback's rows differently (``contrastive``) also take ``fallback``."""


def make_router(kind: str, config: CoeConfig, seed: int | None = None) -> Router:
    """An untrained router of ``kind``, set up from ``config.router`` (body, training).

    Args:
        kind: ``contrastive``, ``setfit``, ``centroid``, ``logreg`` or ``knn``.
        config: the loaded config.
        seed: training seed (default: ``router.seed``).

    Returns:
        A router to ``fit``.

    Raises:
        ConfigError: ``kind`` is not a learned router kind.

    Example:
        >>> r = make_router("centroid", cfg).fit(["hi", "select 1"], ["general", "sql"])
    """
    cls = ROUTER_CLASSES.get(kind)
    if cls is None:
        raise ConfigError(
            f"router.type: {kind!r} is not a learned router; expected one of {', '.join(ROUTER_CLASSES)}"
            + (" (`none` means rules and fallback only: there is nothing to train)" if kind == "none" else ""),
            param="router.type",
        )
    extra = {"fallback": config.router.fallback} if cls is ContrastiveRouter else {}
    return cls(body=body_spec(config), training=config.router.training, seed=config.router.seed if seed is None else seed, **extra)


def training_rows(config: CoeConfig, extra_rows: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The rows a router trains on: every expert's examples (and topics), then ``extra_rows``.

    Args:
        config: the loaded config.
        extra_rows: more rows ``{"text", "label", optional "topic"}``; ``label`` must be a
            declared expert.

    Returns:
        Rows ``{"text": str, "label": expert, "topic": str | None}``, config experts first in
        declaration order.

    Raises:
        ConfigError: an extra row has no text or names an undeclared expert.
    """
    rows = [
        {"text": text, "label": e.name, "topic": topic}
        for e in config.experts
        for text, topic in e.labelled_examples()
    ]
    names = config.expert_names
    for i, row in enumerate(extra_rows):
        rows.append(_check_row(row, names, f"extra_rows[{i}]"))
    return rows


def read_rows(path: str | os.PathLike[str], config: CoeConfig) -> list[dict[str, Any]]:
    """Read extra training rows from a JSONL file (one ``{"text", "label", "topic"?}`` per line).

    Raises:
        ConfigError: the file is missing, a line is not JSON, or a row is invalid; the message
            names the file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--data: file {str(p)!r} not found; give a JSONL file of {{\"text\", \"label\"}} rows", param="data")
    rows = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{p}:{lineno}: not valid JSON ({exc.msg})", param="data") from None
        rows.append(_check_row(raw, config.expert_names, f"{p}:{lineno}"))
    return rows


def _check_row(row: Any, names: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping) or not isinstance(row.get("text"), str) or not row["text"].strip():
        raise ConfigError(f"{where}: expected an object with a non-empty string \"text\" and a \"label\", found {row!r}", param="data")
    label = row.get("label")
    if label not in names:
        raise ConfigError(
            f"{where}: label {label!r} is not a declared expert{_close(str(label), names)} (declared: {', '.join(names)})",
            param="data",
        )
    topic = row.get("topic")
    if topic is not None and not isinstance(topic, str):
        raise ConfigError(f"{where}: topic must be a string, found {topic!r}", param="data")
    return {"text": row["text"], "label": label, "topic": topic or None}


def _close(value: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def examples_fingerprint(config: CoeConfig) -> str:
    """A short hash of the config's examples; a saved router whose hash differs is stale."""
    rows = [(r["text"], r["label"], r["topic"]) for r in training_rows(config)]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()[:16]


def train_router(
    config: CoeConfig,
    extra_rows: Iterable[Mapping[str, Any]] = (),
    seed: int | None = None,
    out: str | os.PathLike[str] | None = None,
    kind: str | None = None,
) -> Router:
    """Train a router from the config's examples (plus ``extra_rows``) and save it.

    Args:
        config: the loaded config.
        extra_rows: more rows ``{"text", "label", optional "topic"}``.
        seed: training seed (default: ``router.seed``).
        out: where to save (default: ``config.router_path``). Written to a temporary sibling
            dir first and swapped in, so a failed training never leaves a half-written router.
        kind: router kind (default: ``router.type``).

    Returns:
        The trained router (already saved).

    Raises:
        ConfigError: the kind is ``none`` or unknown, or an extra row is invalid.
    """
    kind = kind or config.router.type
    rows = training_rows(config, extra_rows)
    router = make_router(kind, config, seed=seed)
    topics = [r["topic"] for r in rows]
    started = time.perf_counter()
    router.fit([r["text"] for r in rows], [r["label"] for r in rows], topics if any(topics) else None)
    router.info = dataclasses.replace(
        router.info,
        extra={
            **router.info.extra,
            "examples_sha": examples_fingerprint(config),
            "n_extra_rows": len(rows) - len(training_rows(config)),
            "fit_seconds": round(time.perf_counter() - started, 2),
        },
    )
    target = Path(out) if out is not None else config.router_path
    _save_atomically(router, target)
    logger.info("saved %s router (%d rows, experts %s) to %s", kind, len(rows), ", ".join(router.experts), target)
    return router


def _save_atomically(router: Router, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        router.save(str(tmp))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_router(path: str | os.PathLike[str] | None, config: CoeConfig) -> Router:
    """Load a saved router of any kind and check it matches the config's experts.

    Args:
        path: the saved router dir (``None``: ``config.router_path``).
        config: the config it will route for.

    Returns:
        The loaded router.

    Raises:
        RouterError: nothing is saved at ``path``; the files are unreadable; or it was trained
            for a different set of experts (both sets are named). Each message says to run
            ``coe train-router``.
    """
    p = Path(path) if path is not None else config.router_path
    retrain = f"run `coe train-router --config {config.source_path or 'experts.yaml'}`" + (
        f" --out {p}" if path is not None and p != config.router_path else ""
    )
    if not (p / INFO_FILE).is_file():
        what = "no trained router" if not p.exists() else f"no {INFO_FILE} (not a trained router)"
        raise RouterError(f"router.path: {what} at {p}; {retrain} first", param="router.path")
    try:
        info = read_info(p)
    except (OSError, ValueError, TypeError) as exc:
        raise RouterError(f"router.path: {p / INFO_FILE} is unreadable ({exc}); {retrain} again", param="router.path") from exc
    _check_experts(info, config, p, retrain)
    cls = ROUTER_CLASSES.get(info.kind)
    if cls is None:
        raise RouterError(
            f"router.path: {p} holds a {info.kind!r} router, which this coe cannot load "
            f"(known: {', '.join(ROUTER_CLASSES)}); {retrain}",
            param="router.path",
        )
    try:
        router = cls.load(str(p), info)
    except RouterError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt/partial files surface as many types
        raise RouterError(f"router.path: cannot load the {info.kind} router at {p} ({type(exc).__name__}: {exc}); {retrain}", param="router.path") from exc
    if info.kind != config.router.type and config.router.type != "none":
        logger.warning("router at %s is a %s router but router.type is %s; %s to switch", p, info.kind, config.router.type, retrain)
    saved_sha = info.extra.get("examples_sha")
    if saved_sha and saved_sha != examples_fingerprint(config):
        logger.warning("router at %s was trained on other examples than %s now declares; %s to pick them up", p, config.source_path or "the config", retrain)
    return router


def _check_experts(info: RouterInfo, config: CoeConfig, path: Path, retrain: str) -> None:
    trained = set(info.experts)
    declared = set(config.expert_names)
    with_examples = {e.name for e in config.experts if e.labelled_examples()}
    if trained - declared or with_examples - trained:
        raise RouterError(
            f"router.path: the router at {path} was trained for experts [{', '.join(sorted(trained))}] but the config "
            f"declares [{', '.join(config.expert_names)}]"
            + (f" (with examples: [{', '.join(sorted(with_examples))}])" if with_examples != declared else "")
            + f"; {retrain} to retrain it",
            param="router.path",
        )
