"""Seeded task data for the embedded experts (sql, json, math) and their checkers.

This is the stable API that expert training (``coe train-expert``), the adapter scoring script
(``python -m train.measure``) and the end-to-end eval (``coe eval-e2e``) share:

- ``generate(task, n, seed, split)`` / ``train_set`` / ``test_set``: rows, deterministic for a
  given (task, n, seed, split) on any machine;
- ``check(task, row, output) -> bool``: did a model answer solve that row;
- ``write_jsonl`` / ``read_jsonl`` / ``write_test_file``: the mixed JSONL test file that
  ``coe eval-e2e --test`` reads.

A row is a JSON-able dict::

    {"id": "sql-test-0-00007", "task": "sql", "split": "test",
     "messages": [{"role": "user", "content": "Schema:\\nCREATE TABLE ...\\n\\nQuestion: ..."}],
     "reference": "SELECT ...;",      # the gold assistant answer (the training target)
     "expected": {...}}               # what the checker compares against (task-specific)

``messages`` holds the user turn only: the expert's system prompt comes from experts.yaml at
serving time. Train and test are disjoint by construction (``task_common.split_of`` hashes the
user message), and ``generate`` asserts it.

This package knows nothing about models, adapters or the serving pipeline.

Example:
    >>> rows = test_set("math", 3, seed=0)
    >>> check("math", rows[0], rows[0]["reference"])
    True
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable

from train import task_json, task_math, task_sql
from train.task_common import SPLITS, split_of

_MODULES = {"sql": task_sql, "json": task_json, "math": task_math}
TASKS: tuple[str, ...] = tuple(_MODULES)
# Seed of the committed held-out sets (model cards and the default e2e eval use it).
DEFAULT_TEST_SEED = 1234
# A generator gets this many draws per requested row before it gives up (its space is too small).
_DRAWS_PER_ROW = 60


def task_module(task: str):
    """The generator module of ``task`` (``sample`` and ``check``); ValueError if unknown."""
    try:
        return _MODULES[task]
    except KeyError:
        raise ValueError(f"task {task!r} is unknown; expected one of {', '.join(TASKS)}") from None


def generate(task: str, n: int, seed: int, split: str = "train") -> list[dict]:
    """``n`` distinct rows of one task and split, deterministic in (task, n, seed, split).

    Args:
        task: ``"sql"``, ``"json"`` or ``"math"``.
        n: number of rows (the first ``n`` of the seeded stream, so a smaller ``n`` is a prefix).
        seed: stream seed; different seeds give different rows.
        split: ``"train"`` or ``"test"``; a user message belongs to exactly one split.

    Returns:
        The rows (see the module docstring for their fields).

    Raises:
        ValueError: unknown task or split, or the generator cannot produce ``n`` distinct rows.
    """
    module = task_module(task)
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is unknown; expected one of {', '.join(SPLITS)}")
    rng = random.Random(f"coe-{task}-{split}-{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(max(1000, _DRAWS_PER_ROW * n)):
        if len(rows) == n:
            break
        cand = module.sample(rng)
        if cand is None:
            continue
        text = cand["messages"][-1]["content"]
        if text in seen or split_of(task, text) != split:
            continue
        seen.add(text)
        rows.append({"id": f"{task}-{split}-{seed}-{len(rows):05d}", "task": task, "split": split, **cand})
    if len(rows) < n:
        raise ValueError(f"task {task!r}: only {len(rows)} distinct {split} rows found for n={n}; ask for fewer")
    assert all(split_of(task, r["messages"][-1]["content"]) == split for r in rows), "split leak"
    return rows


def train_set(task: str, n: int, seed: int = 0) -> list[dict]:
    """Training rows (never overlapping any ``test_set``)."""
    return generate(task, n, seed, "train")


def test_set(task: str, n: int, seed: int = DEFAULT_TEST_SEED) -> list[dict]:
    """Held-out rows for evaluation (never overlapping any ``train_set``)."""
    return generate(task, n, seed, "test")


test_set.__test__ = False  # its name starts with "test": keep pytest from collecting it where imported


def check(task: str, row: dict, output: str) -> bool:
    """Did ``output`` (a model's answer text) solve ``row``?

    Args:
        task: the row's task (``row["task"]``).
        row: a row from ``generate`` or a test JSONL file.
        output: the model's answer, as text.

    Returns:
        True when the answer is correct: SQL returns the gold result set on the row's
        database; JSON's first object has exactly the expected fields; math's last
        ``Answer:`` is the expected number. Malformed output is simply False.
    """
    return bool(task_module(task).check(row, output))


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict]) -> int:
    """Write rows one JSON object per line; returns how many."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with p.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """Read a JSONL test file written by ``write_jsonl``.

    Raises:
        ValueError: a line is not a JSON object with ``task``, ``messages`` and ``expected``
            for a known task (the message names the file and line).
    """
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or row.get("task") not in _MODULES or "expected" not in row or "messages" not in row:
                raise ValueError(
                    f"{path}:{lineno}: expected an object with \"task\" (one of {', '.join(TASKS)}), "
                    "\"messages\" and \"expected\"; regenerate the file with `python -m train.tasks --out FILE`"
                )
            rows.append(row)
    return rows


def write_test_file(path: str | os.PathLike[str], n_per_task: int, seed: int = DEFAULT_TEST_SEED,
                    tasks: Iterable[str] = TASKS) -> int:
    """Write a mixed held-out test file (tasks interleaved, deterministic); returns the row count."""
    per_task = [test_set(t, n_per_task, seed) for t in tasks]
    mixed = [row for group in zip(*per_task) for row in group]
    return write_jsonl(path, mixed)


def main(argv: list[str] | None = None) -> int:
    """``python -m train.tasks --out FILE.jsonl [--n 100] [--seed 1234] [--tasks sql,json,math]``.

    Writes a mixed held-out test file (what ``coe eval-e2e --test`` reads); regenerate it,
    never commit it.
    """
    import argparse

    p = argparse.ArgumentParser(prog="python -m train.tasks", description="write a mixed held-out test file (JSONL)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p.add_argument("--n", type=int, default=100, help="rows per task (default: 100)")
    p.add_argument("--seed", type=int, default=DEFAULT_TEST_SEED, help=f"test-set seed (default: {DEFAULT_TEST_SEED})")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks (default: {','.join(TASKS)})")
    args = p.parse_args(argv)
    try:
        count = write_test_file(args.out, args.n, args.seed, [t.strip() for t in args.tasks.split(",") if t.strip()])
    except ValueError as exc:
        p.error(str(exc))
    print(f"wrote {count} rows to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
