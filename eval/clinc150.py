"""The CLINC150 domain-routing benchmark: 10 domains as 10 experts, plus an out-of-scope fallback.

``build_clinc150`` turns the CLINC150 files (Larson et al., EMNLP 2019; CC BY 3.0) into what
``coe eval-router`` reads: K training rows per intent sampled with a seed (``label`` = domain,
``topic`` = intent), the validation rows (val + oos_val, out-of-scope labelled with the
fallback), and a routing-only ``config.yaml`` whose experts read their examples from
per-domain JSONL files, so ``coe train-router --config`` trains on exactly the same rows.

The official test split is not part of the source data on purpose: nothing here may be tuned
to it. This module only writes files; it knows nothing about routers or metrics.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from coe.errors import ConfigError

FALLBACK = "out_of_scope"
SOURCE_FILES = ("domains.json", "train.jsonl", "val.jsonl", "oos_train.jsonl", "oos_val.jsonl")


@dataclass(frozen=True)
class Clinc150Files:
    """What ``build_clinc150`` wrote.

    Args:
        config: the routing-only experts.yaml.
        train: training rows ``{"text", "label", "topic"}``.
        val: validation rows (in scope and out of scope).
        n_train: training rows, out-of-scope ones included.
        n_val: validation rows.
    """

    config: Path
    train: Path
    val: Path
    n_train: int
    n_val: int


def default_data_dir() -> Path:
    """``../shared/data/clinc150`` next to the repository this package runs from."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "clinc150"


def build_clinc150(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    shots: int = 4,
    seed: int = 42,
    oos_train: int = 0,
    router_type: str = "contrastive",
) -> Clinc150Files:
    """Write the CLINC150 routing benchmark's data and config.

    Args:
        data_dir: folder with ``domains.json``, ``train.jsonl``, ``val.jsonl``,
            ``oos_train.jsonl`` and ``oos_val.jsonl``.
        out_dir: where to write ``config.yaml``, ``train.jsonl``, ``val.jsonl`` and ``experts/``.
        shots: training examples per intent (150 intents), sampled without replacement.
        seed: sampling seed (the same seed gives the same rows).
        oos_train: how many ``oos_train`` rows (in file order) to add as examples of the
            fallback expert, so the router learns what out of scope looks like; 0 for none.
        router_type: ``router.type`` written into the config.

    Returns:
        The written paths and row counts.

    Raises:
        ConfigError: a source file is missing or malformed, or ``shots``/``oos_train`` asks
            for more rows than there are.

    Example:
        >>> files = build_clinc150("../shared/data/clinc150", "runs/clinc150/data", shots=4)  # doctest: +SKIP
        >>> files.n_train
        600
    """
    src, out = Path(data_dir), Path(out_dir)
    missing = [f for f in SOURCE_FILES if not (src / f).is_file()]
    if missing:
        raise ConfigError(
            f"--data-dir: {str(src)!r} lacks {', '.join(missing)}; point it at the CLINC150 folder "
            f"(files {', '.join(SOURCE_FILES)})",
            param="data_dir",
        )
    if shots < 1:
        raise ConfigError(f"--shots: {shots} is out of range; expected at least 1 example per intent", param="shots")
    domains: dict[str, list[str]] = json.loads((src / "domains.json").read_text(encoding="utf-8"))
    intent_domain = {intent: d for d, intents in domains.items() for intent in intents}

    by_intent: dict[str, list[dict[str, Any]]] = {}
    for row in _read(src / "train.jsonl"):
        by_intent.setdefault(row["intent"], []).append(row)
    rng = random.Random(seed)
    train_rows: list[dict[str, Any]] = []
    for intent in sorted(intent_domain):
        pool = by_intent.get(intent, [])
        if len(pool) < shots:
            raise ConfigError(
                f"--shots: {shots} examples of intent {intent!r} asked for, {src / 'train.jsonl'} has {len(pool)}",
                param="shots",
            )
        train_rows += [_row(r["text"], intent_domain[intent], intent) for r in rng.sample(pool, shots)]
    oos_pool = list(_read(src / "oos_train.jsonl"))
    if not 0 <= oos_train <= len(oos_pool):
        raise ConfigError(
            f"--oos-train: {oos_train} is out of range; {src / 'oos_train.jsonl'} has {len(oos_pool)} rows", param="oos_train"
        )
    train_rows += [_row(r["text"], FALLBACK, "oos") for r in oos_pool[:oos_train]]

    val_rows = []
    for r in _read(src / "val.jsonl"):
        if r["intent"] not in intent_domain:
            raise ConfigError(f"{src / 'val.jsonl'}: intent {r['intent']!r} is in no domain of {src / 'domains.json'}")
        val_rows.append(_row(r["text"], intent_domain[r["intent"]], r["intent"]))
    val_rows += [_row(r["text"], FALLBACK, "oos") for r in _read(src / "oos_val.jsonl")]

    out.mkdir(parents=True, exist_ok=True)
    (out / "experts").mkdir(exist_ok=True)
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "val.jsonl", val_rows)
    experts = []
    for name in [*sorted(domains), FALLBACK]:
        rows = [{"text": r["text"], "topic": r["topic"]} for r in train_rows if r["label"] == name]
        expert: dict[str, Any] = {
            "name": name,
            "description": f"CLINC150 domain {name!r}" if name != FALLBACK else "out of scope: no domain fits",
            "adapter": None,
        }
        if rows:
            _write_jsonl(out / "experts" / f"{name}.jsonl", rows)
            expert["examples_file"] = f"experts/{name}.jsonl"
        experts.append(expert)
    config = {
        "version": 1,
        "router": {"type": router_type, "body": None, "path": "router", "threshold": 0.5, "fallback": FALLBACK, "seed": seed},
        "experts": experts,
    }
    header = (
        f"# CLINC150 routing benchmark, written by eval/clinc150.py: {shots} shots per intent, seed {seed}, "
        f"{oos_train} oos_train rows.\n# Routing only (no adapters); regenerate instead of editing.\n"
    )
    (out / "config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return Clinc150Files(config=out / "config.yaml", train=out / "train.jsonl", val=out / "val.jsonl",
                         n_train=len(train_rows), n_val=len(val_rows))


def _row(text: str, label: str, topic: str) -> dict[str, Any]:
    return {"text": text, "label": label, "topic": topic}


def _read(path: Path) -> Iterable[dict[str, Any]]:
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not isinstance(row.get("intent"), str):
            raise ConfigError(f"{path}:{lineno}: expected an object with string \"text\" and \"intent\"")
        yield row


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
