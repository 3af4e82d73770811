"""`coe eval-router` end to end with the real routers and decision chain (centroid/logreg: seconds on CPU)."""

import json

import pytest

from coe import cli
from test_clinc150 import make_source

CONFIG = """
version: 1
router: {type: centroid, fallback: general, threshold: 0.5, seed: 3}
experts:
  - {name: sql, examples: ["list all rows of the users table"]}
  - {name: math, examples: ["what is 12 times 7"]}
  - {name: general}
rules:
  - {name: select-keyword, expert: sql, when: {keywords: [select]}}
"""
TRAIN = [
    ("Write a SQL query that counts the orders per customer", "sql"),
    ("Show every employee whose salary is above 50000 from the staff table", "sql"),
    ("Join the authors and books tables and list each author with their book count", "sql"),
    ("Delete duplicate emails from the contacts table", "sql"),
    ("What is 17 plus 25?", "math"),
    ("A train travels 60 km per hour for 3 hours. How far does it go?", "math"),
    ("If I have 12 apples and give away 5, how many are left?", "math"),
    ("Compute 15 percent of 240", "math"),
]
VAL = [
    ("Query the invoices table for unpaid invoices", "sql"),
    ("How many rows does the products table have, as SQL?", "sql"),
    ("What is 9 times 8?", "math"),
    ("A shirt costs 20 dollars with a 10 percent discount; what is the price?", "math"),
    ("Tell me a fun fact about penguins", "general"),
]
TEST = [
    ("Give me the SQL to find customers without orders in the orders table", "sql"),
    ("select the names from the pets table", "sql"),  # the keyword rule fires
    ("What is 45 divided by 9?", "math"),
    ("Sam has 3 boxes of 12 eggs. How many eggs does he have?", "math"),
    ("Write a short poem about the sea", "general"),
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return str(path)


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "experts.yaml").write_text(CONFIG)
    return {
        "config": str(tmp_path / "experts.yaml"),
        "train": write_rows(tmp_path / "train.jsonl", TRAIN),
        "val": write_rows(tmp_path / "val.jsonl", VAL),
        "test": write_rows(tmp_path / "test.jsonl", TEST),
    }


def test_eval_router_on_a_tiny_config(tmp_path, inputs, capsys):
    out = tmp_path / "report"
    rc = cli.main([
        "eval-router", "--config", inputs["config"], "--train", inputs["train"], "--val", inputs["val"],
        "--test", inputs["test"], "--out", str(out), "--router", "centroid", "--latency-samples", "5",
        "--min-acceptance", "0.75",
    ])
    assert rc == 0
    assert "report:" in capsys.readouterr().out
    for name in ("report.json", "report.md", "confusion.png", "threshold.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    r = report["routers"]["centroid"]
    assert (r["n_train"], r["n_val"], r["n_test"], r["seed"]) == (8, 5, 5, 3)
    # Four obvious in-scope messages, argmax over experts.
    assert r["in_scope_accuracy"] == 1.0
    assert r["calibration"]["in_scope_acceptance"] >= 0.75
    assert r["decisions"]["rules"]["select-keyword"] == {"count": 1, "correct": 1, "precision": 1.0}
    assert r["decisions"]["by_source"]["rule"] == 1
    assert sum(r["decisions"]["by_source"].values()) == 5
    assert r["per_expert"]["sql"]["support"] == 2
    assert set(r["latency_ms"]) == {"p50", "p95", "mean"} and r["throughput_msgs_per_s"] > 0
    assert r["router_info"]["kind"] == "centroid"


def test_clinc150_benchmark_builds_data_then_runs_on_val(tmp_path):
    src = make_source(tmp_path / "src")
    out = tmp_path / "bench"
    rc = cli.main([
        "eval-router", "--benchmark", "clinc150", "--data-dir", str(src), "--shots", "2", "--oos-train", "2",
        "--router", "logreg", "--out", str(out), "--latency-samples", "3", "--seed", "5",
    ])
    assert rc == 0
    assert (out / "data" / "config.yaml").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["benchmark"] == {"name": "clinc150", "shots": 2, "oos_train": 2, "data_dir": str(src)}
    assert report["calibrated_on_test"] is True
    r = report["routers"]["logreg"]
    assert (r["n_train"], r["n_val"], r["n_test"], r["seed"]) == (10, 11, 11, 5)
    assert r["per_expert"]["out_of_scope"]["support"] == 3
    assert "out_of_scope" in r["router_info"]["experts"]  # oos_train rows train the fallback's column


def test_usage_errors_exit_2_and_name_the_flag(tmp_path, inputs, capsys):
    rc = cli.main(["eval-router", "--config", inputs["config"], "--train", inputs["train"], "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "--test: required" in capsys.readouterr().err
    rc = cli.main(["eval-router", "--config", inputs["config"], "--train", inputs["train"], "--test", inputs["test"],
                   "--router", "fasttext", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "--router: 'fasttext'" in capsys.readouterr().err
    rc = cli.main(["eval-router", "--config", inputs["config"], "--train", inputs["train"], "--test", inputs["test"],
                   "--threads", "0", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "--threads: 0 is out of range" in capsys.readouterr().err
