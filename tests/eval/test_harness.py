"""eval.harness end to end over a deterministic fake router: report fields, numbers and files."""

import json

import pytest

from coe.config import config_from_dict
from coe.errors import ConfigError
from eval import harness
from router_fakes import KeywordRouter, TinyChain

CFG = {
    "version": 1,
    "router": {"type": "centroid", "fallback": "general", "threshold": 0.5},
    "experts": [
        {"name": "sql", "examples": ["select rows from the table"]},
        {"name": "math", "examples": ["add two numbers"]},
        {"name": "general"},
    ],
}
TRAIN = [
    harness.Row("select the rows from table users", "sql", "query"),
    harness.Row("join table orders and count rows", "sql", "query"),
    harness.Row("add seven and five", "math", "arith"),
    harness.Row("multiply numbers then add them", "math", "arith"),
]
VAL = [
    harness.Row("count rows of table", "sql"),
    harness.Row("add numbers", "math"),
    harness.Row("table numbers", "sql"),  # 1 hit each: 50/50 score, the weakest in-scope row
    harness.Row("tell me a joke", "general"),
]
TEST = [
    harness.Row("select rows of table items", "sql"),  # sql, confident
    harness.Row("add and multiply numbers", "math"),  # math, confident
    harness.Row("hello there", "general"),  # the greeting rule, right
    harness.Row("hello table rows", "sql"),  # the greeting rule, wrong
    harness.Row("weather forecast please", "general"),  # no word known: 50/50 scores
    harness.Row("numbers in a table", "math"),  # 50/50 tie between sql and math
]


def fakes():
    return {"make_router": lambda kind, cfg, seed=None: KeywordRouter(kind, seed or 0), "make_chain": TinyChain}


def test_run_writes_all_report_files_with_known_numbers(tmp_path):
    cfg = config_from_dict(CFG)
    settings = harness.EvalSettings(seed=3, min_acceptance=0.6, batch_size=4, latency_samples=5)
    report = harness.run(cfg, ["keyword"], TRAIN, VAL, TEST, settings, tmp_path, meta={"test": "inline"}, **fakes())
    for name in ("report.json", "report.md", "confusion.png", "threshold.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["routers"]["keyword"] == json.loads(json.dumps(report["routers"]["keyword"]))

    r = report["routers"]["keyword"]
    assert (r["router"], r["seed"], r["n_train"], r["n_val"], r["n_test"]) == ("keyword", 3, 4, 4, 6)
    # VAL in-scope scores: ~0.98, ~0.98, 0.5; keeping 2 of 3 puts the threshold between 0.5 and 0.98.
    assert 0.5 < r["threshold"] < 0.98
    assert r["calibration"]["in_scope_acceptance"] == pytest.approx(2 / 3)
    # Decisions: sql, math, general (rule), general (rule, wrong), then both 50/50 rows (0.5 < t) to the fallback.
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["oos_recall"] == 1.0
    assert r["oos_precision"] == pytest.approx(2 / 4)
    assert r["in_scope_acceptance"] == pytest.approx(2 / 4)
    assert r["decisions"]["by_source"] == {"router": 2, "rule": 2, "fallback": 2}
    assert r["decisions"]["rules"]["greeting"] == {"count": 2, "correct": 1, "precision": 0.5}
    # Argmax over experts ignoring the threshold; the rule-decided 'hello table rows' is re-scored (sql).
    # The 50/50 tie goes to the first column (math), which is right.
    assert r["in_scope_accuracy"] == pytest.approx(4 / 4)
    assert set(r["per_expert"]) == {"sql", "math", "general"}
    assert r["per_expert"]["sql"]["support"] == 2
    assert r["confusion"]["labels"] == ["sql", "math", "general"]
    assert sum(map(sum, r["confusion"]["matrix"])) == 6
    assert r["latency_ms"]["p50"] > 0 and r["throughput_msgs_per_s"] > 0 and r["train_seconds"] >= 0 and r["train_cpu_seconds"] >= 0
    assert len(r["sweep"]["threshold"]) == 101
    md = (tmp_path / "report.md").read_text()
    assert "| keyword |" in md and "greeting" in md


def test_without_val_the_config_threshold_is_used(tmp_path):
    cfg = config_from_dict(CFG)
    settings = harness.EvalSettings(seed=0, latency_samples=2)
    report = harness.run(cfg, ["keyword"], TRAIN, None, TEST, settings, tmp_path, **fakes())
    r = report["routers"]["keyword"]
    assert r["threshold"] == 0.5 and r["calibration"] is None
    # At 0.5 both 50/50 rows are accepted (0.5 >= 0.5) and go to the first column, math:
    # right for 'numbers in a table', wrong for the out-of-scope weather row.
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["oos_recall"] == pytest.approx(1 / 2)


def test_read_rows_errors_name_file_line_and_value(tmp_path):
    p = tmp_path / "rows.jsonl"
    p.write_text('{"text": "hi", "label": "sql"}\n{"text": "x", "label": "sqll"}\n')
    with pytest.raises(ConfigError, match=r"rows.jsonl:2: label 'sqll' is not an expert.*did you mean 'sql'"):
        harness.read_rows(p, ["sql", "math"])
    p.write_text('{"label": "sql"}\n')
    with pytest.raises(ConfigError, match=r"rows.jsonl:1: expected an object with a non-empty string \"text\""):
        harness.read_rows(p, ["sql"])
    p.write_text("not json\n")
    with pytest.raises(ConfigError, match="rows.jsonl:1: not valid JSON"):
        harness.read_rows(p, ["sql"])
    with pytest.raises(ConfigError, match="file not found"):
        harness.read_rows(tmp_path / "nope.jsonl", ["sql"])
    p.write_text('{"text": "a", "label": "sql", "topic": "q"}\n\n{"text": "b", "label": "sql"}\n')
    assert harness.read_rows(p, ["sql"]) == [harness.Row("a", "sql", "q"), harness.Row("b", "sql", None)]


def test_training_overrides_replace_fields_and_reject_typos():
    cfg = config_from_dict(CFG)
    out = harness.with_training_overrides(cfg, ["logreg_c=10", "use_topics=false"])
    assert out.router.training.logreg_c == 10.0 and out.router.training.use_topics is False
    assert out.router.training.knn_k == cfg.router.training.knn_k
    assert harness.with_training_overrides(cfg, []) is cfg
    with pytest.raises(ConfigError, match="did you mean 'logreg_c'"):
        harness.with_training_overrides(cfg, ["logreg=3"])
    with pytest.raises(ConfigError, match=r"router.training.knn_k: expected an integer, found 'many'"):
        harness.with_training_overrides(cfg, ["knn_k=many"])
