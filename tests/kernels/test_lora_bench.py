"""`python -m kernels.bench` runs on CPU and prints JSON; its PEFT-style baseline computes the same thing."""

from __future__ import annotations

import json

import torch
from lora_cases import Problem

from kernels import bench


def test_peft_style_baseline_matches_the_oracle():
    slots = torch.tensor([2, -1, 0, 2, 1])
    p = Problem(5, 3, 4, d_in=12, output_slices=(8, 4, 4), slots=slots)
    y = bench.peft_style(p.y.clone(), p.x, p.A, p.B, slots.tolist(), p.scale, p.output_slices)
    p.check(y)


def test_quick_bench_prints_json(capsys):
    threads = torch.get_num_threads()
    try:  # one thread: two spinning OpenMP workers on a busy 2-core CI box are slow to time
        assert bench.main(["--quick", "--budget", "0.02", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["torch"] == torch.__version__
    cells = {(r["device"], r["tokens"], r["adapters"]) for r in report["grid"]}
    assert ("cpu", 16, 8) in cells and ("cpu", 1, 1) in cells
    for row in report["grid"]:
        assert row["base_gemm_us"] > 0 and row["peft_loop_us"] > 0 and row["torch_us"] > 0
        assert row["torch_strategy"] in ("single", "padded", "group")
        assert ("triton_us" in row) == (row["device"] == "cuda")
    (decode,) = report["engine_decode"]
    assert decode["ours_layer_us"] > 0 and decode["meta_build_us"] > 0
    (strategies,) = report["strategies"]
    assert strategies["ours_us"] > 0 and strategies["gathered_bmm_us"] > 0
    assert set(report["summary"]) >= {"cpu_min_speedup_vs_peft", "cpu_goal_2x_at_8plus_adapters"}
