"""``coe bench engine`` runs end to end (tiny model, few tokens) and writes every key of issue 6.
Timings are printed, never asserted."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from coe.engine import bench

KEYS = [
    "single_stream_tok_s", "peft_single_stream_tok_s", "single_stream_speedup",
    "mixed16_tok_s", "peft_mixed16_tok_s", "mixed16_speedup",
    "heterogeneity_ratio", "lora_vs_base_ratio", "adapter_switch_ms",
    "cold_load_ms", "itl_p99_during_load_ratio", "peak_rss_mb",
]


def test_bench_engine_writes_all_keys(tmp_path, tiny_dir, capsys):
    out = tmp_path / "bench.json"
    ns = argparse.Namespace(model=str(tiny_dir), json=str(out), threads=1, new_tokens=6, device="cpu", batch=4, quick=True)
    assert bench.main(ns) == 0
    res = json.loads(out.read_text())
    for k in KEYS:
        assert isinstance(res[k], (int, float)) and math.isfinite(res[k]), (k, res.get(k))
    assert res["single_stream_tok_s"] > 0 and res["cold_load_ms"] > 0
    assert res["fused_lora_dtype"] == "float16"
    assert 0 < res["lora_mac_share"] < 1 and res["lora_vs_base_at_mac_share"] == pytest.approx(1 / (1 + res["lora_mac_share"]), abs=1e-4)
    assert "itl_p99_after_load_ratio" in res  # the ITL measurement's control (NaN where no gap follows the load)
    assert res["itl_load_wrote_slot"] is True  # the cold load went into a free slot, as a cold request's does
    assert res["itl_loads"] == 3 and len(res["itl_p99_during_load_ratio_per_load"]) == 3  # pooled over 3 x repeats loads
    import gc

    assert gc.get_freeze_count() == 0  # the bench froze its start-up heap, and unfroze it at the end
    printed = capsys.readouterr().out
    assert "mixed16_speedup" in printed and "goal >= 3.0" in printed


def test_step_times_runs_every_variant_and_restores_the_knobs(tiny_dir):
    from coe.engine import model as M

    before = (M.CHUNK_MAX_ROWS, M.DENSE_LORA_MAX_SLOTS, M.PEFT_ORDER_PROMPTS, M.FUSED_LORA, M.BLOCK_MAX_ROWS)
    res = bench.step_times(str(tiny_dir), threads=1, iterations=2, log=lambda m: None)
    assert set(res["step_ms"]) >= {"single_base", "single_lora", "single_lora_unfused", "base16_f32", "mixed16",
                                 "prompt512_base", "prompt512_lora", "prompt512_lora_c", "prompt512_mixed8"}
    assert all(v > 0 for v in res["step_ms"].values())
    assert (M.CHUNK_MAX_ROWS, M.DENSE_LORA_MAX_SLOTS, M.PEFT_ORDER_PROMPTS, M.FUSED_LORA, M.BLOCK_MAX_ROWS) == before


def test_kernel_times_runs_the_three_cases(tiny_dir):
    from coe.engine.quantized import native_library

    if native_library() is None:
        import pytest

        pytest.skip("block kernels unavailable")
    from coe.engine.quantized import lora_bf16_available

    res = bench.kernel_times(str(tiny_dir), threads=1, iterations=2, rows=5, log=lambda m: None)
    cases = {"base", "one_adapter", "eight_adapters"}
    if lora_bf16_available():  # the same adapters' bfloat16 copies, paired against the float16 ones
        cases |= {"one_adapter_bf16", "eight_adapters_bf16"}
        assert set(res["bf16_minus_f16_ms"]) == {"one_adapter", "eight_adapters"}
    else:
        assert "bf16_minus_f16_ms" not in res
    assert set(res["ms"]) == cases and all(v > 0 for v in res["ms"].values())
    assert res["calls"] > 0 and res["one_over_base"] > 0 and res["eight_over_one"] > 0


def test_phase_times_splits_each_case_by_step_kind(tiny_dir):
    res = bench.phase_times(str(tiny_dir), threads=1, new_tokens=4, batch=4, repeats=1, log=lambda m: None)
    assert set(res["seconds"]) == {"base16", "uniform16", "mixed16"}
    for case in res["seconds"].values():
        assert case["steps"] >= 4  # a prompt step and at least 3 decode steps for 4 new tokens
        assert case["prefill"] > 0 and case["decode"] > 0 and case["outside"] >= 0
        # the kinds add up to the run's wall time (rounded to 3 decimals each)
        assert abs(case["prefill"] + case["decode"] + case["mixed"] + case["outside"] - case["wall"]) < 0.005
    assert set(res["ratios"]) == {"uniform16/base16", "mixed16/uniform16"}
    assert all(v > 0 for v in res["ratios"]["uniform16/base16"].values() if v == v)


def test_lora_mac_share_counts_each_part_of_a_round():
    from coe.engine.model import ModelArgs

    args = ModelArgs(model_type="llama", vocab_size=10, dim=4, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=2,
                     intermediate_size=6, norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=True)
    # per layer and token: q 4x4, k 4x2, v 4x2, o 4x4, gate 4x6, up 4x6, down 6x4 = 120 base
    # multiply-adds; rank 2: 2 x (8 + 6 + 6 + 8 + 10 + 10 + 10) = 116 for the LoRA
    # one request, a 3-token prompt, 2 new tokens: 4 positions (3 prompt + 1 decoded), head on 2
    # tokens (10 x 4 each), attention 2 layers x 2 x 2 heads x 2 dims x (1+2+3+4) positions
    base = 4 * 2 * 120 + 2 * 40 + 2 * 2 * 2 * 2 * 10
    lora = 4 * 2 * 116
    got = bench.lora_mac_share(args, 2, [3], 2)
    assert got["lora_mac_share"] == pytest.approx(lora / base)
    assert got["lora_vs_base_at_mac_share"] == pytest.approx(base / (base + lora))
    two = bench.lora_mac_share(args, 2, [3, 3], 2)  # two identical requests: the same share
    assert two["lora_mac_share"] == pytest.approx(lora / base)


def test_itl_pools_the_loads_so_one_stall_is_not_the_p99_but_a_stall_in_every_load_is(monkeypatch):
    def fake_runs(stalled: set[int]):
        calls = iter(range(100))

        def run(engine, prompts, names, cold, n):
            i = next(calls)
            during = [1.0] * 14 + [10.0 if i in stalled else 1.0]  # one window: 15 step gaps
            return [1.0] * 20 + during, during, 0.5, [1.0] * 5, True
        return run

    monkeypatch.setattr(bench, "_itl_run", fake_runs({3}))
    one = bench._itl_during_load(None, [], [], None, 64, loads=9)
    assert one["itl_loads"] == 9 and one["itl_load_wrote_slot"] is True
    assert one["itl_p99_during_load_ratio"] == pytest.approx(1.0)  # 1 gap of 135: beyond the p99
    assert max(one["itl_p99_during_load_ratio_per_load"]) == pytest.approx(1 + 0.86 * 9, abs=1e-3)  # still reported
    assert one["itl_p99_after_load_ratio"] == pytest.approx(1.0)
    monkeypatch.setattr(bench, "_itl_run", fake_runs(set(range(9))))
    every = bench._itl_during_load(None, [], [], None, 64, loads=9)
    assert every["itl_p99_during_load_ratio"] == pytest.approx(10.0)  # 9 of 135 gaps (7%): the p99 sees them


def test_interleaved_rounds_alternate_their_order():
    seen = []
    cases = {k: (lambda k=k: seen.append(k)) for k in "abc"}
    times = bench._interleaved(cases, 3, lambda m: None, alternate=True)
    assert "".join(seen) == "abccbaabc" and all(len(v) == 3 for v in times.values())
    seen.clear()
    bench._interleaved(cases, 2, lambda m: None)
    assert "".join(seen) == "abcabc"


def test_spread_of_a_ratio():
    # rates' ratio per round = den's time / num's: 1.0, 0.5, 0.8, 0.9; fastest rounds 2.0 and 1.8
    got = bench._spread([2.0, 2.0, 2.4, 1.8], [2.0, 4.0, 3.0, 2.0])
    assert got["median"] == 0.85 and got["q1"] < got["median"] < got["q3"] and got["of_best"] == 0.9
    assert bench._spread([], []) == {}
    assert "ci95" not in got  # too few rounds for an interval


def test_median_ci_brackets_the_median_and_narrows_with_rounds():
    import random

    rng = random.Random(1)
    few = [0.95 + rng.gauss(0, 0.03) for _ in range(8)]
    many = few + [0.95 + rng.gauss(0, 0.03) for _ in range(120)]
    lo, hi = bench._median_ci(few)
    assert lo <= bench._median(few) <= hi
    lo2, hi2 = bench._median_ci(many)
    assert lo2 <= bench._median(many) <= hi2 and hi2 - lo2 < hi - lo
    assert bench._median_ci(few) == (lo, hi)  # seeded: a result file can be recomputed
    assert bench._median_ci(few[:4]) is None
    got = bench._spread([1.0] * 6, [0.9, 0.95, 1.0, 1.05, 1.1, 1.0])
    assert got["ci95"][0] <= got["median"] <= got["ci95"][1]


def test_verdict_reads_a_goal_as_met_only_when_the_interval_clears_it():
    goal = (">=", 0.95)
    assert bench._verdict(0.96, goal, None) == "met" and bench._verdict(0.94, goal, None) == "MISSED"
    assert bench._verdict(0.97, goal, [0.955, 0.98]).startswith("met")
    assert bench._verdict(0.96, goal, [0.94, 0.97]).startswith("UNDECIDED")
    assert bench._verdict(0.93, goal, [0.92, 0.94]).startswith("MISSED")
    assert bench._verdict(0.5, ("<", 1.0), None) == "met"


@pytest.mark.parametrize("value, why", [("0", "at least 1 round"), ("-3", "at least 1 round"), ("x", "whole number")])
def test_ratio_rounds_must_be_a_positive_whole_number(value, why, capsys):
    from coe import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "engine", "--ratio-rounds", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ratio-rounds" in err and why in err
    with pytest.raises(ValueError, match="ratio_rounds must be at least 1"):  # before anything loads
        bench.run("/nonexistent", ratio_rounds=0)


def test_cli_passes_the_fused_lora_dtype():
    """``coe bench engine --fused-lora-dtype`` reaches bench.main (default float16); other values
    are refused by the parser."""
    from coe.cli import build_parser

    p = build_parser()
    assert p.parse_args(["bench", "engine"]).fused_lora_dtype == "float16"
    assert p.parse_args(["bench", "engine", "--fused-lora-dtype", "bfloat16"]).fused_lora_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "engine", "--fused-lora-dtype", "fp8"])


def test_load_times_compares_both_ways_and_restores_the_flags(tiny_dir):
    from coe.engine import scheduler

    before = (scheduler.SLOT_WRITE_SLICE_S, scheduler.READ_IN_PIECES)
    res = bench.load_times(str(tiny_dir), threads=1, loads=2, new_tokens=8, streams=2, log=lambda m: None)
    assert (scheduler.SLOT_WRITE_SLICE_S, scheduler.READ_IN_PIECES) == before
    for way in ("pieces", "whole"):
        assert res[way]["load_ms"] > 0 and res[way]["p99_over_median"] > 0
        assert res[way]["max_over_median"] >= res[way]["p99_over_median"]
        assert len(res[way]["per_load_p99_over_median"]) == 2


def test_pool_runs_pools_the_ratio_rounds_of_several_files(tmp_path):
    runs = []
    for i, (m, u, b) in enumerate([([1.0, 1.1], [1.0, 1.0], [0.9, 0.95]), ([1.2], [1.1], [1.0])]):
        p = tmp_path / f"r{i}.json"
        p.write_text(json.dumps({"ratio_round_seconds": {"mixed16": m, "uniform16": u, "base16": b}}))
        runs.append(p)
    res = bench.pool_runs(runs)
    assert res["ratio_rounds"] == 3
    # per round base16 / uniform16: 0.9, 0.95, 1 / 1.1; uniform16 / mixed16: 1, 1 / 1.1, 1.1 / 1.2
    assert res["lora_vs_base_ratio"]["median"] == pytest.approx(1 / 1.1, abs=1e-4)
    assert res["heterogeneity_ratio"]["median"] == pytest.approx(1.1 / 1.2, abs=1e-4)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json: no ratio_round_seconds"):
        bench.pool_runs([bad])
