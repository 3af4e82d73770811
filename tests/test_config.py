"""experts.yaml schema v1: every load-time error names the field, the value, what was expected
and a close match; the default experts.yaml loads."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from coe.config import SCHEMA_VERSION, config_from_dict, load_config
from coe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def valid() -> dict:
    return {
        "version": 1,
        "router": {"type": "setfit", "threshold": 0.5, "fallback": "general"},
        "experts": [
            {"name": "sql", "examples": ["count the users table", "list all orders"]},
            {"name": "json", "examples": ["extract name as JSON: Bo", "to JSON: a=1"]},
            {"name": "general", "examples": ["hi there"]},
        ],
        "rules": [{"name": "tables", "expert": "sql", "when": {"keywords": ["table"]}}],
    }


def error_of(data) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(data)
    return exc.value


def with_(path: str, value):
    """``valid()`` with one dotted/indexed path set (``experts[0].name``); ``...`` deletes it."""
    data = copy.deepcopy(valid())
    *parents, last = path.replace("]", "").replace("[", ".").split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node.setdefault(p, {})
    key = int(last) if last.isdigit() else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return data


def test_valid_config_loads():
    cfg = config_from_dict(valid())
    assert cfg.expert_names == ("sql", "json", "general")
    assert cfg.router.fallback == "general" and cfg.version == SCHEMA_VERSION


def test_default_experts_yaml_loads():
    cfg = load_config(ROOT / "experts.yaml")
    assert cfg.expert_names == ("sql", "json", "math", "general")
    assert cfg.router.fallback == "general"
    for e in cfg.experts:
        assert len(e.labelled_examples()) >= 12, f"{e.name} needs at least 12 examples"
        assert len(set(e.examples)) == len(e.examples), f"{e.name} has duplicate examples"


# ---------------------------------------------------------------- the five errors of the issue


def test_duplicate_expert():
    data = valid()
    data["experts"].append({"name": "sql", "examples": ["x"]})
    err = error_of(data)
    assert err.param == "experts[3].name"
    assert "duplicate expert 'sql'" in str(err) and "experts[0]" in str(err)


def test_expert_without_examples_when_the_router_needs_them():
    err = error_of(with_("experts[1].examples", []))
    msg = str(err)
    assert err.param == "experts[1].examples"
    assert "'json'" in msg and "no examples" in msg and "setfit" in msg
    assert "examples_file" in msg  # says what to do


def test_fallback_may_have_no_examples_and_router_none_needs_none():
    config_from_dict(with_("experts[2].examples", []))
    data = with_("experts[1].examples", [])
    data["router"]["type"] = "none"
    config_from_dict(data)


def test_rule_targets_unknown_expert_with_a_close_match():
    data = valid()
    data["rules"].append({"name": "r2", "expert": "sqll", "when": {"regex": "x"}})
    data["rules"].append({"name": "r3", "expert": "sql", "when": {"regex": "y"}})
    err = error_of(data)
    assert err.param == "rules[1].expert"
    assert str(err).startswith("rules[1].expert: 'sqll' is not a declared expert; did you mean 'sql'?")
    assert "declared: sql, json, general" in str(err)


@pytest.mark.parametrize(
    ("path", "key", "suggestion"),
    [
        ("router", "treshold", "threshold"),
        ("experts[0]", "exmaples", "examples"),
        ("", "expert", "experts"),
        ("rules[0].when", "keyword", "keywords"),
    ],
)
def test_unknown_key_with_a_close_match(path, key, suggestion):
    data = copy.deepcopy(valid())
    node = data
    for p in path.replace("]", "").replace("[", ".").split(".") if path else []:
        node = node[int(p)] if p.isdigit() else node[p]
    node[key] = node.pop(suggestion) if suggestion in node else 1
    err = error_of(data)
    where = f"{path}.{key}" if path else key
    assert err.param == where
    assert str(err).startswith(f"{where}: unknown key; did you mean '{suggestion}'?")
    assert "allowed here:" in str(err)


def test_fallback_not_an_expert():
    err = error_of(with_("router.fallback", "genral"))
    assert err.param == "router.fallback"
    assert "'genral' is not a declared expert; did you mean 'general'?" in str(err)
    assert "declared: sql, json, general" in str(err)


# ---------------------------------------------------------------- more load-time checks


@pytest.mark.parametrize(
    ("path", "value", "param", "parts"),
    [
        ("router.type", "setfitt", "router.type", ["'setfitt' is not a router", "did you mean 'setfit'?"]),
        ("router.threshold", 1.5, "router.threshold", ["1.5 is out of range", "between 0.0 and 1.0"]),
        ("router.threshold", "high", "router.threshold", ["expected a number", "'high'"]),
        ("router.training.knn_k", 0, "router.training.knn_k", ["0 is out of range"]),
        ("router.training.temperature", 0, "router.training.temperature", ["expected a value > 0"]),
        ("router.training", {"quantize": "int8", "end_to_end": True}, "router.training.quantize", ["end_to_end: false"]),
        ("router.training", {"quantize": "int4"}, "router.training.quantize", ["'int4' is not allowed", "'none', 'int8'"]),
        ("experts[0].name", "SQL Expert", "experts[0].name", ["'SQL Expert' is not a valid expert name"]),
        ("experts[0].name", "auto", "experts[0].name", ["'auto' is reserved"]),
        ("experts[0].threshold", -0.1, "experts[0].threshold", ["out of range"]),
        ("rules[0].when", {}, "rules[0].when", ["'tables' has no conditions", "regex"]),
        ("rules[0].when", {"regex": "(unclosed"}, "rules[0].when.regex", ["'(unclosed' is not a valid regular expression"]),
        ("rules[0].when", {"routed": ["sql"]}, "rules[0].when", ["need `stage: post`"]),
        ("rules[0].stage", "middle", "rules[0].stage", ["'middle' is not allowed", "'pre', 'post'"]),
        ("rules[0].when", {"keywords": {"any": []}}, "rules[0].when.keywords", ["empty"]),
        ("rules[0].when", {"min_length": 10, "max_length": 5}, "rules[0].when.min_length", ["above max_length"]),
        ("version", 2, "version", ["2 is not supported", "expected 1"]),
    ],
)
def test_field_errors(path, value, param, parts):
    err = error_of(with_(path, value))
    assert err.param == param, str(err)
    assert str(err).startswith(param), str(err)
    for part in parts:
        assert part in str(err)


def test_post_rule_routed_must_be_an_expert():
    data = valid()
    data["rules"].append({"name": "p", "stage": "post", "expert": "general", "when": {"routed": ["jsn"]}})
    err = error_of(data)
    assert err.param == "rules[1].when.routed[0]" and "did you mean 'json'?" in str(err)


def test_duplicate_rule_names():
    data = valid()
    data["rules"].append(copy.deepcopy(data["rules"][0]))
    err = error_of(data)
    assert err.param == "rules[1].name" and "duplicate rule name 'tables'" in str(err)


def test_examples_file_is_read_with_topics(tmp_path):
    f = tmp_path / "math.jsonl"
    f.write_text(
        "\n".join(json.dumps(r) for r in [{"text": "2+2?"}, {"text": "20% of 50?", "topic": "percent"}]) + "\n\n",
        encoding="utf-8",
    )
    data = valid()
    data["experts"].append({"name": "math", "examples_file": "math.jsonl"})
    (tmp_path / "experts.yaml").write_text(json.dumps(data), encoding="utf-8")  # JSON is YAML
    cfg = load_config(tmp_path / "experts.yaml")
    assert cfg.expert("math").labelled_examples() == [("2+2?", None), ("20% of 50?", "percent")]


@pytest.mark.parametrize(
    ("content", "parts"),
    [
        (None, ["experts[3].examples_file", "not found"]),
        ('{"text": "ok"}\nnot json\n', ["math.jsonl:2", "not valid JSON"]),
        ('{"txt": "typo"}\n', ["math.jsonl:1", "non-empty string \"text\""]),
    ],
)
def test_examples_file_errors(tmp_path, content, parts):
    if content is not None:
        (tmp_path / "math.jsonl").write_text(content, encoding="utf-8")
    data = valid()
    data["experts"].append({"name": "math", "examples_file": "math.jsonl"})
    (tmp_path / "experts.yaml").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "experts.yaml")
    assert str(exc.value).startswith(str(tmp_path / "experts.yaml"))
    for part in parts:
        assert part in str(exc.value)


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found; pass --config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experts: [\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    err = error_of([1, 2])
    assert "top level: expected a mapping" in str(err)
