"""The repo's experts.yaml end to end: train-router, then route obvious messages of each kind.

Trains the default router exactly as `coe train-router` does (the config's own recipe, which
takes a few fine-tuning steps on ~70 examples), then checks `coe route` on held-out messages
that none of the examples contain.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from coe.cli import main
from coe.config import load_config
from coe.types import RouteContext
from routers import DecisionChain, load_router, train_router

ROOT = Path(__file__).resolve().parents[2]

OBVIOUS = {
    "sql": [
        "Which products had no sales in Q3?",
        "List all employees hired after 2020.",
        "What's the total revenue per region for last year?",
        "Show me the average salary by department.",
        "select count(*) from orders where status = 'open'",
    ],
    "json": [
        "Extract the name, email and company as JSON: Jane Roe (jane@acme.io) works at Acme.",
        "Give me a JSON record {brand, model, year} for: a 2019 Toyota Corolla.",
        "Pull the title and director into JSON: Inception, directed by Christopher Nolan.",
        "Output JSON with fields username and age for: user kim_88 is 27 years old.",
    ],
    "math": [
        "What is 144 divided by 12?",
        "Jo buys 4 books at $12 each. How much does she spend?",
        "A garden is 12 m long and 7 m wide. What is its perimeter?",
        "If a pizza is cut into 8 slices and 3 people each eat 2, how many slices are left?",
    ],
    "general": [
        "hey, what's up?",
        "Write a haiku about the sea.",
        "Recommend a movie for a rainy Sunday.",
        "How do I make a good cup of coffee?",
    ],
}


@pytest.mark.slow
def test_default_config_routes_obvious_messages(tmp_path, capsys):
    cfg = load_config(ROOT / "experts.yaml")
    assert not set(t for ts in OBVIOUS.values() for t in ts) & {t for e in cfg.experts for t in e.examples}
    quiet = dataclasses.replace(cfg.router.training, show_progress=False)
    cfg = cfg.replace(router=dataclasses.replace(cfg.router, training=quiet))
    train_router(cfg, out=tmp_path / "router")
    assert load_router(tmp_path / "router", cfg).info.kind == cfg.router.type == "contrastive"
    capsys.readouterr()  # drop any library log lines

    texts = [t for ts in OBVIOUS.values() for t in ts]
    assert main(["route", "--config", str(ROOT / "experts.yaml"), "--router-path", str(tmp_path / "router"), *texts]) == 0
    decisions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = {t: d["expert"] for t, d in zip(texts, decisions)}
    expected = {t: e for e, ts in OBVIOUS.items() for t in ts}
    assert got == expected

    # the metadata rule of the default config, through the chain
    chain = DecisionChain(cfg, router=load_router(tmp_path / "router", cfg))
    d = chain.decide(RouteContext(text="hey, what's up?", metadata={"tenant": "analytics"}))
    assert (d.expert, d.source, d.rule) == ("sql", "rule", "analytics-tenant")
