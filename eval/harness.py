"""``coe eval-router``: train routers on TRAIN, calibrate on VAL, score the full decision chain on TEST.

For each router kind asked for, the harness:
1. trains it on the TRAIN rows only (``router.fit``), timing it;
2. routes every TEST row through the config's ``DecisionChain`` (rules as configured) in
   batches, timing the batches for throughput, then times single-message decisions;
3. if VAL is given, calibrates the global threshold on the router's VAL scores
   (``eval.metrics.calibrate_threshold``: the highest threshold keeping ``--min-acceptance`` of
   in-scope rows, which maximises OOS recall under that budget); otherwise keeps the config's;
   then decides TEST again at that threshold from the scores kept in step 2 (no re-encoding);
4. scores the decisions (``eval.metrics``) and writes ``report.json``, ``report.md``,
   ``confusion.png`` and ``threshold.png`` (``eval.report``).

``--benchmark clinc150`` first writes the benchmark's rows and config (``eval.clinc150``) under
``OUT/data`` and then evaluates on its val rows, or on ``--test`` when given.

This module glues data, routers and metrics; it computes no metric itself and draws nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import difflib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from coe.config import TRAINABLE_ROUTERS, CoeConfig, load_config
from coe.errors import ConfigError
from coe.types import RouteContext, RouteDecision
from eval import metrics

log = logging.getLogger(__name__)

BASE_MODEL = "(base model)"
"""Stands for "no expert" (a fallback of ``null``) in labels and predictions."""


@dataclass(frozen=True)
class Row:
    """One labelled message: ``label`` is an expert name, the fallback for out-of-scope rows."""

    text: str
    label: str
    topic: str | None = None


@dataclass(frozen=True)
class EvalSettings:
    """How to run one evaluation.

    Args:
        seed: training seed passed to every router.
        min_acceptance: in-scope acceptance the calibrated threshold must keep on VAL.
        batch_size: messages per ``decide_batch`` call when measuring throughput.
        latency_samples: single-message decisions timed for the latency percentiles.
    """

    seed: int
    min_acceptance: float = 0.95
    batch_size: int = 64
    latency_samples: int = 200


def read_rows(path: str | os.PathLike[str], experts: Sequence[str]) -> list[Row]:
    """Read labelled rows ``{"text", "label", optional "topic"}`` from JSONL.

    Args:
        path: the JSONL file.
        experts: the config's expert names; every label must be one of them.

    Returns:
        The rows, in file order.

    Raises:
        ConfigError: the file is missing or empty, or a line is not such a row (file and line named).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: file not found; expected JSONL rows {{\"text\", \"label\", optional \"topic\"}}")
    rows: list[Row] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise ConfigError(f"{where}: expected an object with a non-empty string \"text\"")
        label, topic = obj.get("label"), obj.get("topic")
        if label not in experts:
            close = difflib.get_close_matches(str(label), list(experts), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: label {label!r} is not an expert of the config{hint} (experts: {', '.join(experts)})")
        if topic is not None and not isinstance(topic, str):
            raise ConfigError(f"{where}: \"topic\" must be a string or absent, found {topic!r}")
        rows.append(Row(obj["text"], label, topic or None))
    if not rows:
        raise ConfigError(f"{p}: no rows; expected JSONL rows {{\"text\", \"label\", optional \"topic\"}}")
    return rows


def evaluate_router(
    cfg: CoeConfig,
    kind: str,
    train: Sequence[Row],
    val: Sequence[Row] | None,
    test: Sequence[Row],
    settings: EvalSettings,
    *,
    make_router: Callable[..., Any] | None = None,
    make_chain: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train one router kind and score the decision chain built on it.

    Args:
        cfg: the config (experts, rules, fallback, router settings).
        kind: router kind for ``routers.make_router`` (``setfit``, ``centroid``, ...).
        train: rows to train on.
        val: rows to calibrate the threshold on, or ``None`` to keep ``router.threshold``.
        test: rows to score.
        settings: seed and measurement settings.
        make_router: ``(kind, cfg, seed=) -> Router``; default ``routers.make_router``.
        make_chain: ``(cfg, router=) -> chain`` with ``decide``/``decide_batch``; default
            ``routers.DecisionChain``.

    Returns:
        The router's report entry (see ``eval/README.md`` for the fields).
    """
    if make_router is None or make_chain is None:
        import routers

        make_router = make_router or routers.make_router
        make_chain = make_chain or routers.DecisionChain
    fallback = cfg.router.fallback or BASE_MODEL
    own = {e.name: e.threshold for e in cfg.experts if e.threshold is not None}

    router = make_router(kind, cfg, seed=settings.seed)
    topics = [r.topic for r in train]
    log.info("training %s router on %d rows", kind, len(train))
    t0, c0 = time.perf_counter(), time.process_time()
    router.fit([r.text for r in train], [r.label for r in train], topics if any(topics) else None)
    train_seconds = time.perf_counter() - t0
    # Process CPU time (all threads): on a shared machine the wall time mostly measures the others.
    train_cpu_seconds = time.process_time() - c0
    experts = tuple(router.experts)

    # 1. The timed pass: the chain over TEST in batches, as a server would run it. This is the
    #    only time TEST is encoded; its scores are kept for everything that follows.
    timed_chain = make_chain(cfg, router=router)
    contexts = [RouteContext(text=r.text) for r in test]
    first: list[RouteDecision] = []
    batch_seconds = 0.0
    for start in tqdm(range(0, len(contexts), settings.batch_size), desc=f"{kind}: routing test", unit="batch"):
        chunk = contexts[start : start + settings.batch_size]
        t0 = time.perf_counter()
        first.extend(timed_chain.decide_batch(chunk))
        batch_seconds += time.perf_counter() - t0
    latencies = _single_latencies(timed_chain, contexts, settings.latency_samples)
    test_texts = [r.text for r in test]
    proba = _proba_from_decisions(router, experts, first, test_texts)

    # 2. Calibrate on VAL (reusing TEST's scores when they are the same rows).
    calibration = None
    threshold = cfg.router.threshold
    if val and cfg.router.fallback is not None:  # without a fallback the threshold changes no pick
        val_proba = proba if val is test else _predict_proba(router, [r.text for r in val], settings.batch_size, f"{kind}: scoring val")
        calibration = metrics.calibrate_threshold(
            val_proba, experts, [r.label for r in val], fallback, settings.min_acceptance, own
        )
        threshold = calibration.threshold

    # 3. The decisions at that threshold, through the same chain (rules included), over the kept scores.
    chain = make_chain(cfg.replace(router=dataclasses.replace(cfg.router, threshold=threshold)),
                       router=_KeptScores(router, dict(zip(test_texts, proba))))
    decisions = list(chain.decide_batch(contexts))

    y_true = [r.label for r in test]
    y_pred = [d.expert if d.expert is not None else BASE_MODEL for d in decisions]
    labels = list(dict.fromkeys([*cfg.expert_names, *( [BASE_MODEL] if fallback == BASE_MODEL else [])]))
    entry: dict[str, Any] = {
        "router": kind,
        "seed": settings.seed,
        "n_train": len(train),
        "n_val": len(val) if val else 0,
        "n_test": len(test),
        "threshold": threshold,
        "calibration": calibration.to_dict() if calibration else None,
        **metrics.routing_metrics(y_true, y_pred, fallback, experts=labels),
        "in_scope_accuracy": metrics.in_scope_accuracy(proba, experts, y_true, fallback),
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "latency_ms": metrics.latency_summary(latencies),
        "throughput_msgs_per_s": len(test) / batch_seconds if batch_seconds > 0 else None,
        "batch_size": settings.batch_size,
        "decisions": metrics.decision_stats([d.source for d in decisions], [d.rule for d in decisions], y_true, y_pred),
        "confusion": metrics.confusion(y_true, y_pred, labels),
        "sweep": metrics.threshold_sweep(proba, experts, y_true, fallback, expert_thresholds=own) if cfg.router.fallback else None,
        "router_info": _jsonable(dataclasses.asdict(router.info)) if getattr(router, "info", None) else None,
    }
    return entry


def run(
    cfg: CoeConfig,
    kinds: Sequence[str],
    train: Sequence[Row],
    val: Sequence[Row] | None,
    test: Sequence[Row],
    settings: EvalSettings,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    **factories: Any,
) -> dict[str, Any]:
    """Evaluate every router kind and write the report files into ``out_dir``.

    Args:
        cfg, train, val, test, settings: as in ``evaluate_router``.
        kinds: router kinds to evaluate, in report order.
        out_dir: report directory (created).
        meta: extra top-level report fields (input paths, benchmark settings).
        **factories: ``make_router`` / ``make_chain`` overrides, passed to ``evaluate_router``.

    Returns:
        The report (also written as ``report.json``).
    """
    from eval import report as report_files

    load_before = _loadavg()
    results = {}
    for kind in kinds:
        results[kind] = evaluate_router(cfg, kind, train, val, test, settings, **factories)
    report = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **(meta or {}),
        "fallback": cfg.router.fallback,
        "calibrated_on_test": bool(val) and val is test,
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": _torch_threads(), "loadavg_before": load_before,
                    "loadavg_after": _loadavg()},
        "routers": results,
    }
    report_files.write_all(Path(out_dir), report)
    return report


def main(args: argparse.Namespace) -> int:
    """Entry point of ``coe eval-router`` (flags in ``coe/cli.py``, ``_add_eval_router``)."""
    out = Path(args.out)
    meta: dict[str, Any] = {}
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads: {args.threads} is out of range; expected at least 1", param="threads")
        import torch

        torch.set_num_threads(args.threads)
    if args.benchmark == "clinc150":
        from eval.clinc150 import build_clinc150, default_data_dir

        seed = 42 if args.seed is None else args.seed
        data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
        kind = "contrastive" if args.router == "all" else args.router.split(",")[0].strip()
        files = build_clinc150(data_dir, out / "data", shots=args.shots, seed=seed, oos_train=args.oos_train, router_type=kind)
        args = argparse.Namespace(**{**vars(args), "config": str(files.config), "train": str(files.train), "val": str(files.val),
                                     "seed": seed})
        meta["benchmark"] = {"name": "clinc150", "shots": args.shots, "oos_train": args.oos_train, "data_dir": str(data_dir)}
    for flag in ("config", "train"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag}: required (or use --benchmark clinc150)", param=flag)
    if not args.test and not args.benchmark:
        raise ConfigError("--test: required; pass the JSONL rows to score (or use --benchmark clinc150)", param="test")

    cfg = with_training_overrides(load_config(args.config), args.training)
    kinds = list(TRAINABLE_ROUTERS) if args.router == "all" else [k.strip() for k in args.router.split(",") if k.strip()]
    for kind in kinds:
        if kind not in TRAINABLE_ROUTERS:
            raise ConfigError(f"--router: {kind!r} is not a trainable router; expected one of {', '.join(TRAINABLE_ROUTERS)} or all",
                              param="router")
    names = cfg.expert_names
    train = read_rows(args.train, names)
    val = read_rows(args.val, names) if args.val else None
    same = args.test and args.val and Path(args.test).resolve() == Path(args.val).resolve()
    test = val if (same or not args.test) else read_rows(args.test, names)  # same rows: scored once
    assert test is not None  # the benchmark always has val
    settings = EvalSettings(
        seed=cfg.router.seed if args.seed is None else args.seed,
        min_acceptance=args.min_acceptance,
        latency_samples=args.latency_samples,
    )
    meta.update(training_overrides=list(args.training), config=str(args.config), train=str(args.train), val=args.val and str(args.val), test=str(args.test or args.val))
    report = run(cfg, kinds, train, val, test, settings, out, meta)
    for kind, r in report["routers"].items():
        print(json.dumps({k: r[k] for k in ("router", "accuracy", "in_scope_accuracy", "macro_f1", "oos_recall",
                                            "in_scope_acceptance", "threshold", "train_seconds", "train_cpu_seconds", "throughput_msgs_per_s")}
                         | {"latency_p50_ms": r["latency_ms"]["p50"]}))
    print(f"report: {out / 'report.md'}")
    return 0


def with_training_overrides(cfg: CoeConfig, overrides: Sequence[str]) -> CoeConfig:
    """``cfg`` with ``router.training`` fields replaced by ``KEY=VALUE`` strings (values parsed as YAML).

    Raises:
        ConfigError: an override is not ``KEY=VALUE``, names no training field, or has a bad value.
    """
    import yaml

    from coe.config import RouterTrainingConfig, config_from_dict

    if not overrides:
        return cfg
    fields = {f.name for f in dataclasses.fields(RouterTrainingConfig)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key.strip() not in fields:
            close = difflib.get_close_matches(key.strip(), sorted(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--training: {item!r} is not KEY=VALUE with KEY a router.training field{hint} "
                              f"(fields: {', '.join(sorted(fields))})", param="training")
        changes[key.strip()] = yaml.safe_load(raw)
    # Re-coerce through the loader so a bad value gets the loader's message (router.training.<key>).
    data = {"router": {"training": changes}}
    checked = config_from_dict({**data, "experts": [{"name": "a", "examples": ["x"]}, {"name": "b", "examples": ["y"]}]})
    training = dataclasses.replace(cfg.router.training, **{k: getattr(checked.router.training, k) for k in changes})
    return cfg.replace(router=dataclasses.replace(cfg.router, training=training))


# --------------------------------------------------------------------------- helpers


def _predict_proba(router: Any, texts: Sequence[str], batch_size: int, desc: str) -> np.ndarray:
    parts = [
        np.asarray(router.predict_proba(list(texts[i : i + batch_size])), dtype=float)
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch")
    ]
    return np.concatenate(parts, axis=0)


def _proba_from_decisions(router: Any, experts: Sequence[str], decisions: Sequence[RouteDecision], texts: Sequence[str]) -> np.ndarray:
    """The router's probabilities per test row: from each decision's scores, re-scored where a rule skipped the router."""
    proba = np.zeros((len(decisions), len(experts)))
    missing = []
    for i, d in enumerate(decisions):
        if d.scores and all(e in d.scores for e in experts):
            proba[i] = [d.scores[e] for e in experts]
        else:
            missing.append(i)
    if missing:
        proba[missing] = _predict_proba(router, [texts[i] for i in missing], 64, "scoring rule-decided rows")
    return proba


class _KeptScores:
    """A router that answers from scores already computed (by text), and asks the real one otherwise.

    Lets the harness re-decide TEST at the calibrated threshold without encoding it again.
    """

    def __init__(self, router: Any, kept: dict[str, np.ndarray]) -> None:
        self.router, self.kept = router, kept
        self.info = getattr(router, "info", None)

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(self.router.experts)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.kept]
        if missing:
            self.kept.update(zip(missing, np.asarray(self.router.predict_proba(missing), dtype=float)))
        return np.stack([self.kept[t] for t in texts]) if texts else np.zeros((0, len(self.experts)))


def _single_latencies(chain: Any, contexts: Sequence[RouteContext], n: int) -> list[float]:
    """Wall time of ``n`` single-message decisions (after a short warm-up), cycling over ``contexts``."""
    for ctx in contexts[:3]:
        chain.decide(ctx)
    seconds = []
    for i in tqdm(range(n), desc="single-message latency", unit="msg"):
        ctx = contexts[i % len(contexts)]
        t0 = time.perf_counter()
        chain.decide(ctx)
        seconds.append(time.perf_counter() - t0)
    return seconds


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _torch_threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")  # only report it when a router loaded torch
    return torch.get_num_threads() if torch is not None else None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
