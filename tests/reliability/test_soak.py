"""``coe soak``: the short CI run (16 streaming clients for 30 s against the real server on the tiny
model) and the report's bookkeeping on hand-made outcomes."""

from __future__ import annotations

import argparse
import json
import os

import pytest

from eval.soak import Outcome, SoakRequest, build_pool, main, summarize


def _outcome(model, text, status="completed", answer="abc", expert="json", times=(1.0, 1.1, 1.3)):
    return Outcome(SoakRequest(model, text), status, text=answer, expert=expert, finish_reason="length",
                   started=0.9, token_times=list(times), error=None if status == "completed" else f"{status}: x")


def test_summary_counts_compares_and_measures():
    a, b = SoakRequest("auto", "q1"), SoakRequest("json", "q2")
    solo = {a: _outcome("auto", "q1", answer="same"), b: _outcome("json", "q2", answer="solo text")}
    load = [_outcome("auto", "q1", answer="same"), _outcome("auto", "q1", answer="same", times=(1.2,)),
            _outcome("json", "q2", answer="solo tExt"), _outcome("json", "q2", status="failed", answer=""),
            _outcome("json", "q2", status="truncated", answer="so")]
    r = summarize(load, solo, wall_s=2.0)
    assert (r["sent"], r["completed"], r["failed"], r["truncated"]) == (5, 3, 1, 1)
    assert (r["compared_to_solo"], r["equal_to_solo"]) == (3, 2)
    assert r["mismatches"][0]["first_diff_char"] == 6 and r["mismatches"][0]["load_text"] == "solo tExt"
    assert r["ttft_ms"]["n"] == 3 and r["ttft_ms"]["p50"] == pytest.approx(100.0)  # completed requests only
    assert r["itl_ms"]["n"] == 4 and r["itl_ms"]["p99"] == pytest.approx(200.0)
    # a different expert is a mismatch even with the same text
    assert summarize([_outcome("auto", "q1", answer="same", expert="sql")], solo, 1.0)["equal_to_solo"] == 0


def test_pool_mixes_auto_experts_and_base(tiny):
    from coe.config import load_config

    cfg = load_config(tiny.config_path)
    pool = build_pool(cfg, ["sql", "json", "general", "tiny-llama"], 12)
    assert len(pool) == 12 and len(set(pool)) == 12
    assert sum(r.model == "auto" for r in pool) == 6
    assert {r.model for r in pool} == {"auto", "sql", "json", "general", "tiny-llama"}
    assert {r.text for r in pool} <= {t for e in cfg.experts for t in e.examples}


@pytest.mark.slow
def test_soak_16_clients_30s_on_the_tiny_model(real, tiny, tmp_path):
    """The program against the session's real server (in this process, so the RSS is this process's;
    starting ``coe serve`` in a child costs ~40 s of imports on 2 busy cores, and the child-process
    path is what the full run uses)."""
    out = tmp_path / "soak.json"
    args = argparse.Namespace(config=str(tiny.config_path), url=real.url, clients=16, duration=30.0, max_tokens=16,
                              distinct=24, server_pid=os.getpid(), rss_interval=1.0, request_timeout=120.0,
                              json=str(out))
    rc = main(args)
    report = json.loads(out.read_text())
    summary = {k: report[k] for k in ("sent", "completed", "failed", "truncated", "equal_to_solo_pct",
                                      "ttft_ms", "itl_ms", "failure_examples", "mismatches")}
    assert rc == 0 and report["ok"], summary
    assert report["sent"] >= 16 and report["failed"] == 0 and report["truncated"] == 0
    assert report["equal_to_solo"] == report["compared_to_solo"] == report["completed"] == report["sent"]
    assert report["solo"]["requests"] == 24 and report["solo"]["failed"] == 0
    assert len(report["solo"]["experts_answering"]) >= 3  # the pool reaches several experts and the base
    assert report["ttft_ms"]["p50"] > 0 and report["ttft_ms"]["p99"] >= report["ttft_ms"]["p50"]
    assert report["itl_ms"]["p99"] >= report["itl_ms"]["p50"] > 0
    rss = report["rss"]
    assert len(rss["samples"]) >= 20 and rss["before_load_mb"] > 0 and rss["max_mb"] >= rss["before_load_mb"]
    assert report["server"] == {"url": real.base_url, "started_by_soak": False}
    real.wait_idle()
    print(json.dumps({k: report[k] for k in ("sent", "completed", "ttft_ms", "itl_ms", "requests_per_s")}))
