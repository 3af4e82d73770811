"""eval.clinc150 on a tiny CLINC150-shaped folder: sampling, labels, config, determinism."""

import json

import pytest

from coe.config import load_config
from coe.errors import ConfigError
from eval.clinc150 import FALLBACK, build_clinc150

DOMAINS = {"banking": ["balance", "transfer"], "travel": ["book_flight", "translate"]}


def make_source(root, per_intent=5):
    root.mkdir()
    (root / "domains.json").write_text(json.dumps(DOMAINS))
    rows = lambda intent, domain, n, tag: "".join(  # noqa: E731
        json.dumps({"text": f"{tag} {intent} {i}", "intent": intent, "domain": domain}) + "\n" for i in range(n)
    )
    (root / "train.jsonl").write_text("".join(rows(i, d, per_intent, "train") for d, ins in DOMAINS.items() for i in ins))
    (root / "val.jsonl").write_text("".join(rows(i, d, 2, "val") for d, ins in DOMAINS.items() for i in ins))
    (root / "oos_train.jsonl").write_text(rows("oos", "out_of_scope", 4, "oostrain"))
    (root / "oos_val.jsonl").write_text(rows("oos", "out_of_scope", 3, "oosval"))
    return root


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_samples_k_per_intent_and_writes_a_loadable_config(tmp_path):
    src = make_source(tmp_path / "src")
    files = build_clinc150(src, tmp_path / "out", shots=3, seed=7, oos_train=2, router_type="centroid")
    train = read(files.train)
    assert files.n_train == len(train) == 4 * 3 + 2
    for intent in ("balance", "transfer", "book_flight", "translate"):
        picked = [r for r in train if r["topic"] == intent]
        assert len(picked) == 3 and len({r["text"] for r in picked}) == 3
        assert all(r["text"].startswith("train ") for r in picked)
    assert {r["label"] for r in train if r["topic"] == "translate"} == {"travel"}
    assert [r["text"] for r in train if r["label"] == FALLBACK] == ["oostrain oos 0", "oostrain oos 1"]
    val = read(files.val)
    assert files.n_val == len(val) == 8 + 3
    assert sum(r["label"] == FALLBACK for r in val) == 3

    cfg = load_config(files.config)
    assert cfg.expert_names == ("banking", "travel", FALLBACK)
    assert (cfg.router.type, cfg.router.fallback, cfg.router.seed) == ("centroid", FALLBACK, 7)
    banking = cfg.expert("banking").labelled_examples()
    assert sorted(banking) == sorted((r["text"], r["topic"]) for r in train if r["label"] == "banking")
    assert len(cfg.expert(FALLBACK).labelled_examples()) == 2


def test_same_seed_same_rows_other_seed_other_rows(tmp_path):
    src = make_source(tmp_path / "src", per_intent=20)
    a = read(build_clinc150(src, tmp_path / "a", shots=2, seed=1).train)
    b = read(build_clinc150(src, tmp_path / "b", shots=2, seed=1).train)
    c = read(build_clinc150(src, tmp_path / "c", shots=2, seed=2).train)
    assert a == b and a != c


def test_without_oos_train_the_fallback_has_no_examples(tmp_path):
    files = build_clinc150(make_source(tmp_path / "src"), tmp_path / "out", shots=1)
    assert FALLBACK not in {r["label"] for r in read(files.train)}
    assert load_config(files.config).expert(FALLBACK).labelled_examples() == []


def test_errors_name_the_flag_and_what_is_missing(tmp_path):
    src = make_source(tmp_path / "src")
    with pytest.raises(ConfigError, match=r"--shots: 6 examples of intent 'balance' asked for, .* has 5"):
        build_clinc150(src, tmp_path / "out", shots=6)
    with pytest.raises(ConfigError, match=r"--oos-train: 5 is out of range"):
        build_clinc150(src, tmp_path / "out", oos_train=5)
    (src / "oos_val.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"--data-dir: .* lacks oos_val.jsonl"):
        build_clinc150(src, tmp_path / "out")
