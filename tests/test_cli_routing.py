"""`coe train-router`, `coe route` and `coe bench router` through coe.cli.main (centroid router: fast)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from coe.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent / "routers"))
from routing_helpers import base_dict  # noqa: E402


@pytest.fixture
def cfg_file(tmp_path):
    data = base_dict(type="centroid", path="router")
    data["rules"] = [
        {"name": "acme-math", "expert": "math", "when": {"metadata": {"tenant": "acme"}}},
        {"name": "sql-statement", "expert": "sql", "when": {"regex": r"(?i)\bselect\b.+\bfrom\b"}},
    ]
    f = tmp_path / "experts.yaml"
    f.write_text(json.dumps(data))
    return f


@pytest.fixture
def trained(cfg_file, capsys):
    extra = cfg_file.parent / "extra.jsonl"
    extra.write_text(json.dumps({"text": "What is 7 squared?", "label": "math"}) + "\n")
    assert main(["train-router", "--config", str(cfg_file), "--data", str(extra), "--seed", "3"]) == 0
    out = capsys.readouterr()
    assert "saved centroid router for experts sql, json, math, general" in out.out
    assert f"to {cfg_file.parent / 'router'}" in out.out
    assert "1 from --data" in out.err
    return cfg_file


def route(cfg_file, capsys, *args):
    rc = main(["route", "--config", str(cfg_file), *args])
    out = capsys.readouterr()
    return rc, [json.loads(line) for line in out.out.splitlines()], out.err


def test_train_then_route(trained, capsys):
    info = json.loads((trained.parent / "router" / "router.json").read_text())
    assert info["seed"] == 3 and info["extra"]["n_extra_rows"] == 1
    texts = [
        "How many rows does the orders table have?",
        "Extract the name and age as JSON: Ana, 31.",
        "What is 12 plus 30?",
        "Hi! How is your day going?",
        "select id from users",
    ]
    rc, decisions, _ = route(trained, capsys, *texts)
    assert rc == 0 and len(decisions) == len(texts)
    for d in decisions:
        assert set(d) == {"expert", "source", "score", "reason", "scores"}
    assert [d["expert"] for d in decisions] == ["sql", "json", "math", "general", "sql"]
    assert decisions[0]["source"] in ("router", "fallback") and set(decisions[0]["scores"]) == {"sql", "json", "math", "general"}
    assert decisions[4]["source"] == "rule" and "sql-statement" in decisions[4]["reason"]


def test_route_metadata_feeds_rules(trained, capsys):
    rc, decisions, _ = route(trained, capsys, "--metadata", "tenant=acme", "hello there")
    assert rc == 0 and (decisions[0]["expert"], decisions[0]["source"]) == ("math", "rule")


def test_route_bad_metadata_is_a_usage_error(trained, capsys):
    rc, _, err = route(trained, capsys, "--metadata", "tenant", "hello")
    assert rc == 2 and "--metadata: 'tenant' is not KEY=VALUE" in err


def test_route_without_a_trained_router(cfg_file, capsys):
    rc, decisions, err = route(cfg_file, capsys, "hello")
    assert rc == 1 and decisions == []
    assert "no trained router" in err and "coe train-router" in err


def test_route_with_router_type_none_needs_no_router(tmp_path, capsys):
    data = base_dict(type="none")
    f = tmp_path / "none.yaml"
    f.write_text(json.dumps(data))
    rc, decisions, _ = route(f, capsys, "anything")
    assert rc == 0 and (decisions[0]["expert"], decisions[0]["source"]) == ("general", "fallback")
    assert main(["train-router", "--config", str(f)]) == 2
    assert "nothing" not in capsys.readouterr().out


def test_train_router_config_errors_exit_2(cfg_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "sqll"}) + "\n")
    assert main(["train-router", "--config", str(cfg_file), "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: label 'sqll' is not a declared expert; did you mean 'sql'?" in err
    assert main(["train-router", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_bench_router_prints_json(trained, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "router", "--config", str(trained), "--repeats", "10", "--batch-sizes", "1,4", "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert {"embed", "predict_proba", "decide"} <= set(printed["latency"])
    assert printed["latency"]["decide"]["n"] == 10 and printed["latency"]["decide"]["p50_ms"] > 0
    assert set(printed["throughput"]) == {"1", "4"}
    assert printed["meta"]["router"] == "centroid"
