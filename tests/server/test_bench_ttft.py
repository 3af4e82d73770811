"""The TTFT benchmark program runs end to end (against the fake engine: numbers are not checked,
only that every key is produced and the pairs really compare auto with the routed expert)."""

from __future__ import annotations

from coe.server.app import create_app
from coe.server.auth import ApiKeys
from eval.bench_ttft import _prompts, run
from live import LiveServer


def test_bench_ttft_runs_against_a_server(fake_setup):
    cfg, engine, pipeline = fake_setup
    with LiveServer(create_app(cfg, pipeline=pipeline, api_keys=ApiKeys())) as s:
        out = run(s.base_url, ["select rows from the table", "extract json please"], requests=4, max_tokens=2,
                  api_key=None, warmup=1)
    for key in ("ttft_auto_p50_ms", "ttft_explicit_p50_ms", "overhead_p50_ms", "overhead_paired_p50_ms",
                "route_p50_ms", "ttft_auto_p95_ms"):
        assert isinstance(out[key], float), key
    assert out["experts_routed"] == ["json", "sql"]
    models = [c["adapter"] for c in engine.calls]
    # each auto request has an explicit twin on the same adapter: 1 warmup pair + 2 pairs on the
    # sql prompt, 2 pairs on the json prompt
    assert models.count("sql") == 6 and models.count("json") == 4


def test_prompts_cover_every_expert(fake_setup):
    from coe.config import config_from_dict

    cfg = config_from_dict({"version": 1, "router": {"type": "none", "fallback": "b"},
                            "experts": [{"name": "a", "examples": ["a1", "a2"]}, {"name": "b", "examples": ["b1"]}]})
    assert _prompts(cfg) == ["a1", "b1", "a2"]
