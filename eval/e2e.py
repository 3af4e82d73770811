"""``coe eval-e2e``: task success end to end, base model vs ``auto`` routing vs the oracle expert.

Every test row is a chat whose answer a program can check (``train.tasks.check``: SQL executed
in sqlite and its rows compared, JSON parsed and its fields compared, the math ``Answer:``
compared), plus routing-only rows (chit-chat for the fallback expert) that have no checker.
Each checked row is answered three ways through the in-process ``coe.pipeline.Pipeline``:

- **base**: ``model=<base model id>`` (no adapter), given the row's expert's system prompt and
  ``max_tokens``, so the only difference from the oracle is the adapter;
- **oracle**: ``model=<the row's expert>`` (what a perfect router would buy);
- **auto**: ``model="auto"``: rules, router, fallback and post-rules decide, exactly as served.

All three decode greedily (``temperature=0``). Requests are submitted from a thread pool of
``serving.max_batch`` threads so the engine batches them. A request identical to one already
scheduled (same adapter, messages and sampling: an ``auto`` row routed to its own expert sends
exactly the oracle's request) is generated once and its answer shared, so ``auto`` and
``oracle`` differ only where the routing did; ``--no-share`` generates every request anyway.

Routing accuracy counts every row (checked and routing-only): ``auto``'s decided expert vs the
row's ``expert`` label. Outputs go to ``OUT/report.json``, ``OUT/report.md`` and ``OUT/rows.jsonl``
(every answer with its verdict, so any number in the report can be recomputed).

The default test set is seeded and regenerated, never stored: ``--limit`` rows (default 40) of
each task in ``train.tasks.TASKS`` whose expert exists in the config (held-out split,
``DEFAULT_TEST_SEED``), interleaved, plus as many chit-chat rows from ``GENERAL_PROMPTS``
labelled with ``router.fallback`` (if that expert exists and is not itself a task).

This module knows the pipeline's public API and the task checkers; it knows nothing about
HTTP, the engine's internals or how the router was trained.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import random
import shlex
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from coe.config import CoeConfig, load_config
from coe.errors import CoeError, ConfigError
from train import tasks

log = logging.getLogger(__name__)

CONDITIONS = ("base", "auto", "oracle")
DEFAULT_PER_TASK = 40
BASE_LABEL = "(base model)"
"""Stands for a decision with no expert (a ``null`` fallback) in routing tables."""
# Goals of issue 8, reported against (never asserted): an adapter "beats the base by a wide
# margin" when its oracle success is at least this many points above the base model's.
MARGIN_GOAL = 0.25
AUTO_RATIO_GOAL = 0.95

# Held-out chit-chat for the fallback expert: written for this eval, none of them is among the
# experts' router examples in experts.yaml. They are routed, not generated (no checker).
GENERAL_PROMPTS: tuple[str, ...] = (
    "Good morning! Did you sleep well?",
    "What's your favourite season of the year, and why?",
    "Can you suggest a name for my new coffee shop?",
    "I'm feeling a bit bored. Any ideas for a rainy afternoon?",
    "Tell me something interesting about the moon.",
    "What is a good gift for my grandmother's birthday?",
    "How do I keep my houseplants alive while I'm on holiday?",
    "Which is better for a beginner, the guitar or the piano?",
    "Write a haiku about the sea.",
    "Who wrote Pride and Prejudice?",
    "What are some fun things to do in Barcelona?",
    "Can you explain what photosynthesis is in simple words?",
    "How can I get better at remembering people's names?",
    "Thanks a lot for your help earlier!",
    "What's the difference between weather and climate?",
    "Recommend a film for a cosy evening at home.",
    "How do I make a good cup of tea?",
    "Why do cats purr?",
    "Tell me a story about a brave little mouse.",
    "What language is spoken in Brazil?",
    "Any tips for staying focused while working from home?",
    "Describe a sunset to someone who has never seen one.",
    "What is the tallest mountain in Africa?",
    "Should I learn French or Spanish first?",
    "Give me a motivational quote for Monday morning.",
    "How do bees make honey?",
    "What's a polite way to decline a party invitation?",
    "Which planets can you see without a telescope?",
    "Suggest a simple vegetarian lunch.",
    "What does a lighthouse keeper do?",
    "Can you tell me a riddle?",
    "How do I start journaling?",
    "What were the Olympic Games like in ancient Greece?",
    "Please write a friendly birthday message for my colleague Ana.",
    "How do I stop my glasses from fogging up?",
    "Why do leaves change colour in the fall?",
    "What music would you play at a summer barbecue?",
    "Is it better to stretch before or after running?",
    "Say hello in five different languages.",
    "What is the plot of Romeo and Juliet, in two sentences?",
)


@dataclass(frozen=True)
class Settings:
    """How one evaluation runs.

    Args:
        concurrency: requests in flight at once (default: the config's ``serving.max_batch``).
        share: generate identical requests once (see the module docstring).
        progress: show tqdm bars.
    """

    concurrency: int | None = None
    share: bool = True
    progress: bool = True


# --------------------------------------------------------------------------- test rows


def default_rows(cfg: CoeConfig, per_task: int = DEFAULT_PER_TASK, seed: int = tasks.DEFAULT_TEST_SEED) -> list[dict]:
    """The seeded default test set for ``cfg`` (see the module docstring).

    Raises:
        ConfigError: the config has no expert named after any task (nothing to check).
    """
    names = set(cfg.expert_names)
    task_names = [t for t in tasks.TASKS if t in names]
    if not task_names:
        raise ConfigError(
            f"{cfg.source_path or 'config'}: no expert is named after a checkable task ({', '.join(tasks.TASKS)}); "
            "pass --test FILE.jsonl with rows whose \"expert\" names your experts"
        )
    groups = [tasks.test_set(t, per_task, seed) for t in task_names]
    rows = [{**r, "expert": r["task"]} for group in zip(*groups) for r in group]
    fallback = cfg.router.fallback
    if fallback and fallback in names and fallback not in tasks.TASKS:
        prompts = list(GENERAL_PROMPTS)
        random.Random(f"coe-e2e-general-{seed}").shuffle(prompts)
        rows += [{"id": f"general-{seed}-{i:05d}", "task": None, "expert": fallback,
                  "messages": [{"role": "user", "content": text}]} for i, text in enumerate(prompts[:per_task])]
    return rows


def read_rows(path: str | os.PathLike[str], cfg: CoeConfig, limit: int | None = None) -> list[dict]:
    """Read a test file: ``train.tasks`` rows, and routing-only rows.

    A checked row has ``task`` (one of ``train.tasks.TASKS``), ``messages`` and ``expected``
    (``python -m train.tasks --out FILE`` writes them); its ``expert`` label defaults to the
    task's name. A routing-only row has ``messages`` and ``expert`` and no ``task``.

    Args:
        path: the JSONL file.
        cfg: the config (every label must be one of its experts).
        limit: keep at most this many rows per task (routing-only rows count as one task).

    Raises:
        ConfigError: the file is missing or a line is malformed (names the file and line).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--test: {p} does not exist; write one with `python -m train.tasks --out {p}`", param="test")
    names = cfg.expert_names
    rows: list[dict] = []
    kept: Counter[str | None] = Counter()
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not valid JSON ({exc.msg})", param="test") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}", param="test")
            task = row.get("task")
            msgs = row.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "content" in m for m in msgs):
                raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{role, content}} objects", param="test")
            if task is not None and task not in tasks.TASKS:
                raise ConfigError(f"{where}: task {task!r} has no checker; expected one of {', '.join(tasks.TASKS)}, "
                                  "or no \"task\" for a routing-only row", param="test")
            if task is not None and "expected" not in row:
                raise ConfigError(f"{where}: a {task} row needs \"expected\" (regenerate with `python -m train.tasks`)", param="test")
            expert = row.get("expert", task)
            if expert not in names:
                raise ConfigError(f"{where}: expert {expert!r} is not in the config (experts: {', '.join(names)}); "
                                  "set the row's \"expert\" to one of them", param="test")
            if limit is not None and kept[task] >= limit:
                continue
            kept[task] += 1
            rows.append({**row, "id": str(row.get("id", f"line-{lineno}")), "task": task, "expert": expert})
    if not rows:
        raise ConfigError(f"--test: {p} has no rows", param="test")
    return rows


# --------------------------------------------------------------------------- running


def evaluate(pipeline: Any, rows: Sequence[dict], settings: Settings = Settings(),
             check: Callable[[str, dict, str], bool] | None = None) -> tuple[dict, list[dict]]:
    """Answer and score every row; returns ``(report, row_records)``.

    Args:
        pipeline: a ready ``coe.pipeline.Pipeline``.
        rows: rows from ``default_rows`` or ``read_rows`` (each with ``expert``; ``task`` or None).
        settings: concurrency, sharing, progress bars.
        check: ``(task, row, text) -> bool`` (default ``train.tasks.check``, looked up at call time).

    Returns:
        The report dict (written as report.json) and one record per row (rows.jsonl).
    """
    check = check or tasks.check
    cfg: CoeConfig = pipeline.config
    base_id = pipeline.base_id
    records: list[dict] = []
    # Each unique backend request -> the (record, condition) slots waiting for its answer.
    unique: dict[str, Any] = {}
    waiting: dict[str, list[tuple[dict, str]]] = defaultdict(list)
    t0 = time.perf_counter()
    for row in tqdm(rows, desc="routing", unit="row", disable=not settings.progress):
        msgs = [{"role": m.get("role", "user"), "content": m["content"]} for m in row["messages"]]
        rec: dict[str, Any] = {"id": row["id"], "task": row.get("task"), "expert": row["expert"],
                               "prompt": msgs[-1]["content"]}
        try:
            auto = pipeline.prepare_chat(msgs, model="auto", sampling=_greedy())
        except CoeError as exc:  # the row cannot even be routed: a wrong route, reported
            rec["route"] = {"expert": None, "source": "error", "score": None, "error": exc.message}
            auto = None
        else:
            d = auto.decision
            rec["route"] = {"expert": d.expert, "source": d.source, "score": None if d.score is None else round(float(d.score), 4),
                            "rule": d.rule}
        records.append(rec)
        if row.get("task") is None:
            continue  # routing-only row
        expert = cfg.expert(row["expert"])
        base_msgs = ([{"role": "system", "content": expert.system_prompt}] if expert.system_prompt
                     and not any(m["role"] == "system" for m in msgs) else []) + msgs
        prepared = {
            "base": lambda: pipeline.prepare_chat(base_msgs, model=base_id,
                                                  sampling=_greedy(expert.generation.max_tokens)),
            "oracle": lambda: pipeline.prepare_chat(msgs, model=row["expert"], sampling=_greedy()),
            "auto": lambda: auto,
        }
        for cond in CONDITIONS:
            try:
                req = prepared[cond]()
            except CoeError as exc:
                req, rec[cond] = None, {"ok": False, "error": exc.message}
            if req is None:
                rec.setdefault(cond, {"ok": False, "error": rec["route"].get("error", "not routed")})
                continue
            key = _request_key(req) if settings.share else f"{row['id']}/{cond}"
            unique.setdefault(key, req)
            waiting[key].append((rec, cond))
    route_s = time.perf_counter() - t0

    by_row = {r["id"]: r for r in rows}
    answers = _generate(pipeline, unique, settings)
    tokens = 0
    for key, (out, err) in answers.items():
        tokens += out.completion_tokens if out is not None else 0
        for rec, cond in waiting[key]:
            if out is None:
                rec[cond] = {"ok": False, "error": err}
                continue
            ok = bool(check(rec["task"], by_row[rec["id"]], out.text))
            rec[cond] = {"ok": ok, "text": out.text, "finish_reason": out.finish_reason,
                         "completion_tokens": out.completion_tokens}
            if len(waiting[key]) > 1:
                rec[cond]["shared_with"] = [f"{r2['id']}/{c}" for r2, c in waiting[key] if not (r2 is rec and c == cond)]
    gen_s = time.perf_counter() - t0 - route_s
    report = summarize(records, cfg)
    report["run"] = {
        "requests_planned": sum(len(v) for v in waiting.values()), "requests_generated": len(unique),
        "share": settings.share, "concurrency": _concurrency(pipeline, settings),
        "completion_tokens": tokens, "route_seconds": round(route_s, 2), "generate_seconds": round(gen_s, 2),
        "tokens_per_second": round(tokens / gen_s, 1) if gen_s > 0 else None,
    }
    return report, records


def _greedy(max_tokens: int | None = None):
    from coe.types import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def _request_key(req: Any) -> str:
    """Identical keys mean the backend would receive the identical request."""
    return json.dumps([req.adapter, req.prompt, list(req.messages or ()), asdict(req.sampling)], sort_keys=True, default=str)


def _concurrency(pipeline: Any, settings: Settings) -> int:
    return max(1, settings.concurrency or pipeline.config.serving.max_batch)


def _generate(pipeline: Any, unique: dict[str, Any], settings: Settings) -> dict[str, tuple[Any, str | None]]:
    """Run every unique request from a thread pool (the engine batches concurrent calls)."""
    results: dict[str, tuple[Any, str | None]] = {}
    lock = threading.Lock()

    def one(key: str) -> None:
        try:
            out = pipeline.run(unique[key])
            res = (out, None)
        except CoeError as exc:  # one bad request must not sink the evaluation
            res = (None, exc.message)
        with lock:
            results[key] = res

    with ThreadPoolExecutor(max_workers=_concurrency(pipeline, settings), thread_name_prefix="e2e") as pool:
        futures = [pool.submit(one, k) for k in unique]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="generating", unit="req",
                        disable=not settings.progress):
            fut.result()
    return results


# --------------------------------------------------------------------------- scoring


def summarize(records: Sequence[dict], cfg: CoeConfig) -> dict[str, Any]:
    """Task success per task and overall, routing accuracy and the goals, from row records."""
    checked = [r for r in records if r["task"] is not None]
    per_task: dict[str, Any] = {}
    for task in sorted({r["task"] for r in checked}, key=lambda t: tasks.TASKS.index(t)):
        rs = [r for r in checked if r["task"] == task]
        per_task[task] = _success(rs)
        per_task[task]["experts"] = sorted({r["expert"] for r in rs})
    overall = _success(checked)

    def label(name: str | None) -> str:
        return BASE_LABEL if name is None else name

    confusion: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        confusion[r["expert"]][label(r["route"]["expert"])] += 1
    correct = sum(c[e] for e, c in confusion.items())
    per_expert = {e: {"n": sum(c.values()), "correct": c[e], "accuracy": c[e] / sum(c.values())}
                  for e, c in sorted(confusion.items())}
    sources = Counter(r["route"]["source"] for r in records)
    routing = {"n": len(records), "correct": correct, "accuracy": correct / len(records) if records else None,
               "checked_rows_accuracy": _mean(r["route"]["expert"] == r["expert"] for r in checked),
               "per_expert": per_expert, "sources": dict(sorted(sources.items())),
               "confusion": {e: dict(sorted(c.items())) for e, c in sorted(confusion.items())}}
    ratio = overall.get("auto_over_oracle")
    goals = {
        "margin_goal": MARGIN_GOAL,
        "adapter_margins": {t: v["oracle_minus_base"] for t, v in per_task.items()},
        "adapters_beat_base": all(v["oracle_minus_base"] is not None and v["oracle_minus_base"] >= MARGIN_GOAL
                                  for v in per_task.values()) if per_task else None,
        "auto_ratio_goal": AUTO_RATIO_GOAL,
        "auto_over_oracle": ratio,
        "auto_reaches_ratio": None if ratio is None else ratio >= AUTO_RATIO_GOAL,
    }
    return {"tasks": per_task, "overall": overall, "routing": routing, "goals": goals}


def _success(rs: Sequence[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rs)}
    for cond in CONDITIONS:
        ok = sum(1 for r in rs if r[cond]["ok"])
        out[cond] = ok / len(rs) if rs else None
        out[f"{cond}_correct"] = ok
        out[f"{cond}_errors"] = sum(1 for r in rs if "error" in r[cond])
    out["oracle_minus_base"] = None if not rs else out["oracle"] - out["base"]
    out["auto_over_oracle"] = out["auto"] / out["oracle"] if rs and out["oracle"] else None
    return out


def _mean(values: Any) -> float | None:
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


# --------------------------------------------------------------------------- writing


def write_report(out_dir: str | os.PathLike[str], report: dict, records: Sequence[dict]) -> None:
    """Write report.json, report.md and rows.jsonl into ``out_dir`` (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    tasks.write_jsonl(out / "rows.jsonl", records)


def markdown(report: dict) -> str:
    """The report as a Markdown page (numbers only rendered, never computed here)."""
    g, o, rt, run = report["goals"], report["overall"], report["routing"], report["run"]
    lines = ["# End-to-end evaluation (`coe eval-e2e`)", "",
             f"config: `{report['config']}`; test set: {report['test']}; created {report['created']}.", "",
             f"Command: `{report['command']}`", "",
             "Task success (share of answers the task's checker accepts; greedy decoding):", "",
             "| task | n | base | auto | oracle | oracle - base | auto / oracle |", "|---|---:|---:|---:|---:|---:|---:|"]
    for task, t in report["tasks"].items():
        lines.append(f"| {task} | {t['n']} | {_pct(t['base'])} | {_pct(t['auto'])} | {_pct(t['oracle'])} | "
                     f"{_pts(t['oracle_minus_base'])} | {_ratio(t['auto_over_oracle'])} |")
    lines.append(f"| **overall** | {o['n']} | {_pct(o['base'])} | {_pct(o['auto'])} | {_pct(o['oracle'])} | "
                 f"{_pts(o['oracle_minus_base'])} | {_ratio(o['auto_over_oracle'])} |")
    lines += ["", f"Routing accuracy (auto's expert vs the row's): **{_pct(rt['accuracy'])}** "
                  f"({rt['correct']}/{rt['n']} rows; checked rows only: {_pct(rt['checked_rows_accuracy'])}). "
                  f"Decision sources: {', '.join(f'{k} {v}' for k, v in rt['sources'].items())}.", "",
              "| expected \\ routed to | " + " | ".join(_columns(rt)) + " | accuracy |",
              "|---" * (len(_columns(rt)) + 2) + "|"]
    for expert, row in rt["confusion"].items():
        lines.append(f"| {expert} | " + " | ".join(str(row.get(c, 0)) for c in _columns(rt))
                     + f" | {_pct(rt['per_expert'][expert]['accuracy'])} |")
    margins = ", ".join(f"{t} {_pts(m)}" for t, m in g["adapter_margins"].items())
    lines += ["", "Goals:", "",
              f"- each adapter beats the base model on its own task by >= {g['margin_goal'] * 100:.0f} points: "
              f"{_yes(g['adapters_beat_base'])} ({margins})",
              f"- auto >= {g['auto_ratio_goal']:.2f} x oracle: {_yes(g['auto_reaches_ratio'])} "
              f"(auto / oracle = {_ratio(g['auto_over_oracle'])})", "",
              "Conditions: **base** = the base model without adapter, given the row's expert system prompt and "
              "max_tokens; **oracle** = `model=<the row's expert>`; **auto** = `model=auto` (rules, router, "
              "fallback, post-rules). Routing-only rows (chit-chat) count for routing accuracy only.", "",
              f"Run: {run['requests_generated']} generations for {run['requests_planned']} answers "
              f"({'identical requests shared' if run['share'] else 'no sharing'}), {run['concurrency']} in flight, "
              f"{run['completion_tokens']} tokens in {run['generate_seconds']:.0f} s "
              f"({run['tokens_per_second']} tok/s); routing {run['route_seconds']:.1f} s."]
    m = report.get("machine") or {}
    if m:
        lines.append(f"Machine: {m.get('cpu_count')} CPUs; load average before {m.get('loadavg_before')}, "
                     f"after {m.get('loadavg_after')}.")
    return "\n".join(lines) + "\n"


def _columns(rt: dict) -> list[str]:
    cols = sorted({c for row in rt["confusion"].values() for c in row} | set(rt["confusion"]))
    return cols


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _yes(x: bool | None) -> str:
    return "n/a" if x is None else ("yes" if x else "**no**")


# --------------------------------------------------------------------------- command


def main(args: argparse.Namespace) -> int:
    """``coe eval-e2e --config CFG [--test FILE.jsonl] --out DIR [--limit N] [--seed S]``.

    Args:
        args: ``config``, ``test``, ``out``, ``limit`` (rows per task), and optionally ``seed``,
            ``concurrency``, ``no_share``, ``no_progress`` (see ``coe eval-e2e -h``).

    Returns:
        0; config or test-file problems raise ``ConfigError`` (exit 2), load failures ``CoeError`` (exit 1).
    """
    from coe.pipeline import Pipeline

    cfg = load_config(args.config)
    seed = getattr(args, "seed", None)
    seed = tasks.DEFAULT_TEST_SEED if seed is None else seed
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit: {limit} is not a row count; expected an integer >= 1", param="limit")
    if args.test:
        rows = read_rows(args.test, cfg, limit)
        test_desc = f"`{args.test}`"
    else:
        per_task = limit or DEFAULT_PER_TASK
        rows = default_rows(cfg, per_task, seed)
        test_desc = (f"default: {per_task} held-out rows per task (seed {seed}) + "
                     f"{sum(1 for r in rows if r['task'] is None)} chit-chat rows")
    settings = Settings(concurrency=getattr(args, "concurrency", None), share=not getattr(args, "no_share", False),
                        progress=not getattr(args, "no_progress", False))
    load_before = _loadavg()
    say = lambda msg: print(f"coe eval-e2e: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    counts = ", ".join(f"{k or 'routing-only'} {v}" for k, v in Counter(r["task"] for r in rows).items())
    say(f"{len(rows)} rows ({counts}); loading the pipeline")
    t0 = time.perf_counter()
    pipeline = Pipeline.from_config(cfg, train_router_if_missing=True)
    load_s = time.perf_counter() - t0
    try:
        report, records = evaluate(pipeline, rows, settings)
    finally:
        pipeline.shutdown(0.0)
    report = {
        "command": shlex.join(["coe", *sys.argv[1:]]) if Path(sys.argv[0]).name == "coe" else
        f"coe eval-e2e --config {args.config}" + (f" --test {args.test}" if args.test else "") + f" --out {args.out}"
        + (f" --limit {limit}" if limit else ""),
        "config": str(cfg.source_path), "test": test_desc, "seed": seed,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": pipeline.base_id, "experts": list(cfg.expert_names),
        **report,
        "machine": {"cpu_count": os.cpu_count(), "load_seconds": round(load_s, 1),
                    "loadavg_before": load_before, "loadavg_after": _loadavg()},
    }
    write_report(args.out, report, records)
    print(markdown(report))
    say(f"wrote {Path(args.out) / 'report.json'}, report.md and rows.jsonl")
    return 0


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
