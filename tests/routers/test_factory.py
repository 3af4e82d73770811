"""make_router / training_rows / train_router / load_router (centroid routers: fast, real body)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from coe.errors import ConfigError, RouterError
from routers import load_router, make_router, read_rows, train_router, training_rows
from routers.baselines import CentroidRouter, LogRegRouter
from routers.setfit_router import SetFitRouter
from routing_helpers import GENERAL, JSON, MATH, SQL, base_dict, make_config

PROBE = ["count the rows of the users table", "extract the name as JSON: Bo", "what is 3 times 9?", "hello!"]


def test_make_router_kinds():
    cfg = make_config()
    assert isinstance(make_router("setfit", cfg), SetFitRouter)
    assert isinstance(make_router("centroid", cfg), CentroidRouter)
    assert isinstance(make_router("logreg", cfg, seed=5), LogRegRouter)
    assert make_router("logreg", cfg, seed=5).seed == 5 and make_router("knn", cfg).seed == 7
    with pytest.raises(ConfigError, match="'nope' is not a learned router; expected one of contrastive, setfit, centroid"):
        make_router("nope", cfg)
    with pytest.raises(ConfigError, match="nothing to train"):
        make_router("none", cfg)


def test_training_rows_from_examples_topics_and_extra_rows():
    data = base_dict()
    data["experts"][2] = {"name": "math", "examples": ["2+2?"], "topics": {"percent": ["20% of 50?", "5% of 80?"]}}
    cfg = make_config(data)
    rows = training_rows(cfg, [{"text": "drop table x", "label": "sql"}, {"text": "1/2 of 8", "label": "math", "topic": "fractions"}])
    assert rows[0] == {"text": SQL[0], "label": "sql", "topic": None}
    math_rows = [r for r in rows if r["label"] == "math"]
    assert math_rows == [
        {"text": "2+2?", "label": "math", "topic": None},
        {"text": "20% of 50?", "label": "math", "topic": "percent"},
        {"text": "5% of 80?", "label": "math", "topic": "percent"},
        {"text": "1/2 of 8", "label": "math", "topic": "fractions"},
    ]
    assert rows[-2] == {"text": "drop table x", "label": "sql", "topic": None}
    assert len(rows) == len(SQL) + len(JSON) + 3 + len(GENERAL) + 2


@pytest.mark.parametrize(
    ("row", "parts"),
    [
        ({"text": "x", "label": "sqll"}, ["extra_rows[0]", "'sqll' is not a declared expert", "did you mean 'sql'?"]),
        ({"text": "", "label": "sql"}, ["extra_rows[0]", "non-empty string \"text\""]),
        ({"label": "sql"}, ["extra_rows[0]", "\"text\""]),
        ({"text": "x", "label": "sql", "topic": 3}, ["topic must be a string"]),
    ],
)
def test_bad_extra_rows(row, parts):
    with pytest.raises(ConfigError) as exc:
        training_rows(make_config(), [row])
    for part in parts:
        assert part in str(exc.value)


def test_read_rows(tmp_path):
    cfg = make_config()
    f = tmp_path / "extra.jsonl"
    f.write_text(json.dumps({"text": "sum 2 and 2", "label": "math"}) + "\n\n" + json.dumps({"text": "hey", "label": "general"}) + "\n")
    assert read_rows(f, cfg) == [{"text": "sum 2 and 2", "label": "math", "topic": None}, {"text": "hey", "label": "general", "topic": None}]
    with pytest.raises(ConfigError, match="not found"):
        read_rows(tmp_path / "missing.jsonl", cfg)
    f.write_text('{"text": "ok", "label": "math"}\n{oops\n')
    with pytest.raises(ConfigError, match=r"extra.jsonl:2: not valid JSON"):
        read_rows(f, cfg)
    f.write_text('{"text": "ok", "label": "maths"}\n')
    with pytest.raises(ConfigError, match=r"extra.jsonl:1: label 'maths' is not a declared expert; did you mean 'math'\?"):
        read_rows(f, cfg)


@pytest.fixture
def saved(tmp_path):
    """A config file in tmp_path whose router.path is relative, and a centroid router trained there."""
    data = base_dict(type="centroid", path="state/router")
    cfg_file = tmp_path / "experts.yaml"
    cfg_file.write_text(json.dumps(data))
    cfg = make_config(data, source_path=str(cfg_file))
    router = train_router(cfg, extra_rows=[{"text": "How much is 6 times 7?", "label": "math"}])
    return cfg, router


def test_train_router_saves_where_the_config_says(saved, tmp_path):
    cfg, router = saved
    assert cfg.router_path == tmp_path / "state" / "router"
    assert (cfg.router_path / "router.json").is_file()
    assert sorted(p.name for p in cfg.router_path.parent.iterdir()) == ["router"]  # no temp dirs left
    info = json.loads((cfg.router_path / "router.json").read_text())
    assert info["kind"] == "centroid" and info["experts"] == ["sql", "json", "math", "general"]
    assert info["n_train"] == len(SQL) + len(JSON) + len(MATH) + len(GENERAL) + 1
    assert info["extra"]["n_extra_rows"] == 1 and len(info["extra"]["examples_sha"]) == 16


def test_load_router_gives_identical_scores(saved):
    cfg, router = saved
    loaded = load_router(None, cfg)
    assert isinstance(loaded, CentroidRouter) and loaded.info == router.info
    np.testing.assert_array_equal(loaded.predict_proba(PROBE), router.predict_proba(PROBE))


def test_retraining_replaces_the_saved_router(saved):
    cfg, first = saved
    second = train_router(cfg, kind="logreg", seed=1)
    assert load_router(None, cfg).info == second.info != first.info
    assert sorted(p.name for p in cfg.router_path.parent.iterdir()) == ["router"]


def test_missing_router_tells_the_user_to_train(tmp_path):
    cfg = make_config(base_dict(path=str(tmp_path / "nothing")))
    with pytest.raises(RouterError) as exc:
        load_router(None, cfg)
    assert f"no trained router at {tmp_path / 'nothing'}" in str(exc.value) and "coe train-router" in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RouterError, match="no router.json .*coe train-router"):
        load_router(tmp_path / "empty", cfg)


def test_router_for_other_experts_names_both_sets(saved):
    cfg, _ = saved
    data = base_dict(type="centroid", path=str(cfg.router_path))
    data["experts"][1]["name"] = "extract"
    other = make_config(data)
    with pytest.raises(RouterError) as exc:
        load_router(None, other)
    msg = str(exc.value)
    assert "trained for experts [general, json, math, sql]" in msg
    assert "declares [sql, extract, math, general]" in msg
    assert "coe train-router" in msg and "retrain" in msg


def test_corrupt_router_files_are_a_router_error(saved):
    cfg, _ = saved
    (cfg.router_path / "head.npz").write_bytes(b"not a zip")
    with pytest.raises(RouterError, match="cannot load the centroid router .*`coe train-router"):
        load_router(None, cfg)
    (cfg.router_path / "router.json").write_text("{")
    with pytest.raises(RouterError, match="router.json is unreadable"):
        load_router(None, cfg)


def test_stale_examples_and_kind_mismatch_warn(saved, caplog):
    cfg, _ = saved
    data = base_dict(type="setfit", path=str(cfg.router_path))
    data["experts"][0]["examples"] = SQL + ["Delete the duplicate rows from the contacts table."]
    with caplog.at_level(logging.WARNING, logger="routers.factory"):
        load_router(None, make_config(data))
    text = caplog.text
    assert "is a centroid router but router.type is setfit" in text
    assert "trained on other examples" in text
