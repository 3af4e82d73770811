"""Task generators: seeded, deterministic, split-disjoint, valid gold; the JSONL round trip."""

from __future__ import annotations

import json
import random

import pytest

from train.tasks import TASKS, check, generate, read_jsonl, test_set, train_set, write_jsonl, write_test_file
from train import task_sql as sql_task
from train.task_common import split_of
from train.task_math import _calc

SIZES = {"sql": 40, "json": 200, "math": 200}


def _texts(rows):
    return [r["messages"][-1]["content"] for r in rows]


@pytest.mark.parametrize("task", TASKS)
def test_generate_is_deterministic_and_seeded(task):
    n = SIZES[task] // 2
    a, b = train_set(task, n, seed=3), train_set(task, n, seed=3)
    assert json.dumps(a) == json.dumps(b)
    assert _texts(train_set(task, n, seed=4)) != _texts(a)
    # A smaller n is a prefix of the same stream.
    assert json.dumps(train_set(task, n // 2, seed=3)) == json.dumps(a[: n // 2])


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_and_rows_distinct(task):
    train = train_set(task, SIZES[task], seed=0) + train_set(task, SIZES[task], seed=1)
    test = test_set(task, SIZES[task] // 2)
    assert not set(_texts(train)) & set(_texts(test))
    assert len(set(_texts(test))) == len(test)
    assert all(split_of(task, t) == "train" for t in _texts(train))
    assert all(split_of(task, t) == "test" for t in _texts(test))
    assert all(r["split"] == "test" and r["task"] == task for r in test)


@pytest.mark.parametrize("task", TASKS)
def test_rows_have_the_documented_fields_and_gold_passes(task):
    for row in test_set(task, SIZES[task] // 2):
        assert {"id", "task", "split", "messages", "reference", "expected"} <= set(row)
        assert row["messages"][-1]["role"] == "user"
        json.dumps(row)  # JSON-able
        assert check(task, row, row["reference"]), row


def test_every_gold_sql_executes_with_rows():
    rows = train_set("sql", 60, seed=5) + test_set("sql", 30)
    seen_schemas = set()
    for row in rows:
        exp = row["expected"]
        result = sql_task.execute_readonly(exp["setup"], exp["sql"])
        assert result and not all(v in (None, 0) for r in result for v in r)
        # The message shows exactly the tables the database has.
        for line in exp["setup"].splitlines():
            if line.startswith("CREATE TABLE"):
                assert line in row["messages"][-1]["content"]
        seen_schemas.add(exp["schema"])
    assert seen_schemas == set(sql_task.SCHEMAS)


def test_every_sql_template_is_reachable_and_valid():
    """Each template of each schema executes against a few seeded databases."""
    rng = random.Random(0)
    for schema, (build, templates) in sql_task._SCHEMAS.items():
        for template in templates:
            ok = 0
            for _ in range(5):
                tables, facts = build(rng)
                values = {slot: draw(rng, facts) for slot, draw in template.slots.items()}
                if "month" in values:
                    values["month_like"] = values["month"] + "%"
                setup = "\n".join(c for c, _ in tables.values()) + "\n" + "\n".join(
                    sql_task._insert(name, rows) for name, (_, rows) in tables.items())
                ok += bool(sql_task.execute_readonly(setup, sql_task._fill(template.sql, values)))
            assert ok, (schema, template.sql)


def test_math_worked_solutions_are_true():
    for row in train_set("math", 300, seed=2):
        lines = row["reference"].splitlines()
        assert lines[-1] == f"Answer: {row['expected']['answer']}"
        for line in lines[:-1]:
            *exprs, value = line.split(" = ")
            assert exprs and all(_calc(e) == int(value) for e in exprs), line


def test_unknown_task_and_split_are_clear_errors():
    with pytest.raises(ValueError, match="unknown"):
        generate("poetry", 3, 0)
    with pytest.raises(ValueError, match="split"):
        generate("math", 3, 0, split="validation")


def test_jsonl_round_trip_and_mixed_file(tmp_path):
    path = tmp_path / "test.jsonl"
    count = write_test_file(path, 4)
    rows = read_jsonl(path)
    assert count == len(rows) == 12
    assert [r["task"] for r in rows[:3]] == list(TASKS)
    assert all(check(r["task"], r, r["reference"]) for r in rows)
    write_jsonl(tmp_path / "copy.jsonl", rows)
    assert read_jsonl(tmp_path / "copy.jsonl") == rows


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "math", "messages": [], "expected": {"answer": 1}}\n{"task": "poetry"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
        read_jsonl(path)
