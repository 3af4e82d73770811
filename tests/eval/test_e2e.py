"""``coe eval-e2e`` end to end on the tiny random Llama (tests/tiny.py): real pipeline, engine and router.

The tiny model answers gibberish, so the real checkers would score everything 0 and prove
nothing about the arithmetic. The end-to-end test swaps ``train.tasks.check`` for a stub whose
verdict depends on the generated text, then recomputes every number of the report from
rows.jsonl. A second test exercises the test-file validation (no model loaded).
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from coe import cli  # noqa: E402
from train import tasks  # noqa: E402

CONDITIONS = ("base", "auto", "oracle")


def stub_check(task: str, row: dict, text: str) -> bool:
    """Accepts about half the answers, depending on the answer text and the row."""
    return zlib.crc32(f"{row['id']}|{text}".encode()) % 2 == 0


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    from tiny import tiny_assets, tiny_experts_yaml

    root = tmp_path_factory.mktemp("e2e")
    assets = tiny_assets(root)
    # SQL prompts carry their schema: ~340 tokens with the tiny 384-token BPE.
    return tiny_experts_yaml(root, assets.model_dir, assets.adapters, serving={"max_seq_len": 512},
                             filename="e2e.yaml")


def _read(out: Path) -> tuple[dict, list[dict]]:
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    return report, rows


def test_eval_e2e_end_to_end_numbers_are_consistent(tiny_config, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tasks, "check", stub_check)
    out = tmp_path / "e2e"
    rc = cli.main(["eval-e2e", "--config", str(tiny_config), "--out", str(out), "--limit", "4", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    report, rows = _read(out)

    # The default set over the tiny config: sql and json have experts (math has none), and the
    # fallback "general" gets chit-chat rows; all interleaved and seeded.
    by_task: dict = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    assert {k: len(v) for k, v in by_task.items()} == {"sql": 4, "json": 4, None: 4}
    assert [r["id"] for r in by_task["sql"]] == [r["id"] for r in tasks.test_set("sql", 4)]
    assert all(r["expert"] == "general" and "base" not in r for r in by_task[None])

    # Every success rate is the stub's verdict on the stored answer text.
    checked = by_task["sql"] + by_task["json"]
    for r in checked:
        row = {"id": r["id"]}
        for cond in CONDITIONS:
            assert "error" not in r[cond], r[cond]
            assert r[cond]["ok"] == stub_check(r["task"], row, r[cond]["text"])
    for task, group in (("sql", by_task["sql"]), ("json", by_task["json"]), (None, checked)):
        stats = report["overall"] if task is None else report["tasks"][task]
        assert stats["n"] == len(group)
        for cond in CONDITIONS:
            assert stats[f"{cond}_correct"] == sum(r[cond]["ok"] for r in group)
            assert stats[cond] == pytest.approx(stats[f"{cond}_correct"] / len(group))
        assert stats["oracle_minus_base"] == pytest.approx(stats["oracle"] - stats["base"])
        if stats["oracle"]:
            assert stats["auto_over_oracle"] == pytest.approx(stats["auto"] / stats["oracle"])

    # Routing accuracy counts every row, chit-chat included, against auto's decision.
    routing = report["routing"]
    hits = [r["route"]["expert"] == r["expert"] for r in rows]
    assert routing["n"] == len(rows) == 12
    assert routing["correct"] == sum(hits)
    assert routing["accuracy"] == pytest.approx(sum(hits) / len(rows))
    assert sum(sum(c.values()) for c in routing["confusion"].values()) == len(rows)

    # auto routed to the row's own expert sends the oracle's exact request: one generation, one answer.
    shared = [r for r in checked if r["route"]["expert"] == r["expert"]]
    for r in shared:
        assert r["auto"]["text"] == r["oracle"]["text"]
        assert f"{r['id']}/oracle" in r["auto"]["shared_with"]
    run = report["run"]
    assert run["requests_planned"] == 3 * len(checked)
    assert run["requests_generated"] == run["requests_planned"] - len(shared)
    assert run["completion_tokens"] > 0

    # The base condition really runs without the adapter: the random adapters change the answers.
    assert any(r["base"]["text"] != r["oracle"]["text"] for r in checked)
    goals = report["goals"]
    assert goals["adapter_margins"] == {t: report["tasks"][t]["oracle_minus_base"] for t in ("sql", "json")}
    assert goals["auto_over_oracle"] == report["overall"]["auto_over_oracle"]

    md = (out / "report.md").read_text()
    assert "| task | n | base | auto | oracle |" in md and "**overall**" in md
    assert f"{100 * report['overall']['oracle']:.1f}%" in md
    assert "| sql |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "line, expected",
    [
        ("not json", "not valid JSON"),
        ('{"task": "poetry", "messages": [{"role": "user", "content": "hi"}], "expected": {}}', "has no checker"),
        ('{"task": "sql", "messages": [{"role": "user", "content": "hi"}]}', 'needs "expected"'),
        ('{"messages": [{"role": "user", "content": "hi"}], "expert": "chef"}', "expert 'chef' is not in the config"),
        ('{"task": "sql", "messages": [], "expected": {}}', '"messages" must be a non-empty list'),
    ],
)
def test_bad_test_file_is_a_config_error_naming_the_line(tiny_config, tmp_path, capsys, line, expected):
    good = json.dumps(tasks.test_set("json", 1)[0])
    path = tmp_path / "test.jsonl"
    path.write_text(good + "\n" + line + "\n")
    rc = cli.main(["eval-e2e", "--config", str(tiny_config), "--test", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{path}:2" in err and expected in err
    assert not (tmp_path / "o").exists()


def test_test_file_rows_and_limit(tiny_config, tmp_path):
    from coe.config import load_config
    from eval.e2e import read_rows

    path = tmp_path / "t.jsonl"
    tasks.write_test_file(path, 3, tasks=("sql", "json"))
    with path.open("a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "hello there"}], "expert": "general"}) + "\n")
    rows = read_rows(path, load_config(tiny_config), limit=2)
    assert [r["task"] for r in rows] == ["sql", "json", "sql", "json", None]
    assert rows[-1]["expert"] == "general" and rows[0]["expert"] == "sql"
