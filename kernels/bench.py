"""``python -m kernels.bench``: time the multi-LoRA ops against a PEFT-style loop and the base GEMM.

Prints one JSON document on stdout (progress goes to stderr). Two sections:

* ``grid``: the issue's grid. For T in {1, 16, 256} tokens spread over {1, 8, 32} adapters,
  r = 16, (d_in, d_out) in {(576, 576), (576, 1536), (4096, 4096), (4096, 11008)}: the base GEMM
  ``x @ W^T``, a PEFT-style per-adapter loop, our torch path and, with CUDA, our Triton path and
  the torch path on the GPU (fp16, plus T = 64, where the GPU goal is stated). Times are per
  LoRA op (one layer).
* ``engine_decode``: what one SmolLM2 layer costs the engine per decode step on CPU (hidden 576,
  intermediate 1536, GQA q/k/v widths 576/192/192): ``add_lora_packed`` for q/k/v and gate/up plus
  ``add_lora`` for o and down, all sharing one ``LoRAMeta`` over 8 stacked slots, against the same
  four projections done PEFT-style and against the layer's four base GEMMs; plus the per-step
  ``LoRAMeta.build`` cost and the cost of a step without adapters.
* ``backends``: one SmolLM2 step's LoRA work (30 layers x q/k/v, o, gate/up, down, r=16, 8
  stacked slots, each layer's weights distinct so none is cached), native (C) against torch
  backend, for T in {1, 16, 76, 480, 1024, 2048} tokens all on one slot and spread over 8: where
  each backend wins (``kernels.native_ops.SINGLE_SLOT_MAX_TOKENS``). Times per step.
* ``strategies``: the CPU formulations considered for the torch path (group-by-slot, gathered
  bmm, gathered einsum, dense over all slots, PEFT's loop) against what ``torch`` picks, on one
  projection; how the single/padded/group choice was made.

Timing: the candidates of a cell run interleaved, round after round, so that load from other
processes hits them alike; each number is the median over rounds, and each speedup is the median
of the per-round ratios. GPU times use CUDA events after a warm-up (compiles excluded).

Usage::

    python -m kernels.bench                 # the full run (minutes on 2 CPU cores)
    python -m kernels.bench --quick         # a tiny subset, seconds (what the tests run)
    python -m kernels.bench --threads 1 --clock cpu   # steadier numbers on a busy machine
    python -m kernels.bench --threads 2 --out bench.json

This module knows nothing about the engine beyond the layer shapes it mimics.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels import LoRAMeta, add_lora, add_lora_packed, torch_ops

GRID_TOKENS = (1, 16, 256)
GRID_ADAPTERS = (1, 8, 32)
GRID_RANK = 16
GRID_DIMS = ((576, 576), (576, 1536), (4096, 4096), (4096, 11008))

# SmolLM2-135M: hidden 576, 9 heads x 64, 3 kv heads x 64, intermediate 1536
SMOL_HIDDEN, SMOL_KV, SMOL_INTER = 576, 192, 1536
DECODE_TOKENS = (1, 4, 16)
DECODE_ADAPTERS = (1, 4, 8)
DECODE_RANKS = (8, 16)
BACKEND_TOKENS = (1, 16, 76, 480, 1024, 2048)
SMOL_LAYERS = 30


def peft_style(y, x, A, B, adapter_names: list[int], scale: float, output_slices=None):
    """What PEFT's ``_mixed_batch_forward`` does per LoRA layer, over slot views of A and B.

    Per layer: Python index lists per adapter, then per adapter a gather, two ``F.linear`` and a
    scatter-add. Packed projections are separate PEFT modules, so each slice repeats the loop.
    """
    slices = output_slices or (y.shape[1],)
    rank = A.shape[1] // len(slices)
    unique = set(adapter_names)
    index_lists = {a: [i for i, n in enumerate(adapter_names) if n == a] for a in unique}
    off = 0
    for i, d in enumerate(slices):
        for a in unique:
            if a < 0:
                continue
            rows = index_lists[a]
            sub = x[rows]
            out = F.linear(F.linear(sub, A[a, i * rank : (i + 1) * rank]), B[a, off : off + d]) * scale
            y[rows, off : off + d] += out
        off += d
    return y


# Strategies measured for the CPU path (kernels/README.md, "strategy choice"); ``torch`` picks one
# of single/padded/group per step. Each takes (y, x, A, B, slots, scale) for one projection.
def group_by_slot(y, x, A, B, slots, scale):
    """Per active slot: index_select -> mm -> mm -> index_add_ (host loop over slots)."""
    for s in torch.unique(slots).tolist():
        if s >= 0:
            rows = torch.nonzero(slots == s).flatten()
            y.index_add_(0, rows, (x.index_select(0, rows) @ A[s].t()) @ B[s].t(), alpha=scale)
    return y


def gathered_bmm(y, x, A, B, slots, scale):
    """Each token's own copy of its slot's A and B (index_select), two bmm; -1 rows masked."""
    idx = slots.clamp(min=0)
    h = torch.bmm(A.index_select(0, idx), x.unsqueeze(2))  # [T, r, 1]
    h.mul_((slots >= 0).to(h.dtype).view(-1, 1, 1))
    return y.add_(torch.bmm(B.index_select(0, idx), h).squeeze(2), alpha=scale)


def gathered_einsum(y, x, A, B, slots, scale):
    """As gathered_bmm, through einsum (the few-token formulation)."""
    idx = slots.clamp(min=0)
    h = torch.einsum("trd,td->tr", A.index_select(0, idx), x) * (slots >= 0).to(x.dtype).unsqueeze(1)
    return y.add_(torch.einsum("tor,tr->to", B.index_select(0, idx), h), alpha=scale)


def dense_all_slots(y, x, A, B, slots, scale):
    """Shrink against every slot in one mm, keep each token's own slot, expand as a bmm over slots."""
    S, r, _ = A.shape
    h = torch.mm(x, A.reshape(S * r, -1).t()).view(-1, S, r)  # [T, S, r]
    onehot = torch.nn.functional.one_hot(slots.clamp(min=0), S).to(h.dtype) * (slots >= 0).to(h.dtype).unsqueeze(1)
    h.mul_(onehot.unsqueeze(2))
    return y.add_(torch.bmm(h.transpose(0, 1), B.transpose(1, 2)).sum(0), alpha=scale)


STRATEGIES = {
    "peft_loop": None,  # peft_style, with the host-side adapter names PEFT keeps per request
    "group_by_slot": group_by_slot,
    "gathered_bmm": gathered_bmm,
    "gathered_einsum": gathered_einsum,
    "dense_all_slots": dense_all_slots,
}
STRATEGY_CELLS = ((1, 1), (4, 4), (16, 1), (16, 8), (64, 8), (256, 8))  # (tokens, adapters)
STRATEGY_DIMS = ((576, 1536), (1536, 576))


def _slots(num_tokens: int, num_adapters: int, seed: int = 0) -> torch.Tensor:
    """Tokens spread round-robin over the adapters, shuffled (every adapter used when T allows)."""
    gen = torch.Generator().manual_seed(seed)
    slots = torch.arange(num_tokens) % num_adapters
    return slots[torch.randperm(num_tokens, generator=gen)]


_clock = time.perf_counter  # --clock cpu: time.process_time (CPU time of this process, all threads)


def _time_cpu(fns: dict[str, Callable[[], object]], budget_s: float, min_rounds: int = 5) -> dict[str, list[float]]:
    """Interleaved rounds; each round times every candidate once over ``inner`` calls."""
    for fn in fns.values():
        fn()
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    one_round = time.perf_counter() - start
    inner = max(1, int(0.01 / max(one_round, 1e-9)))  # a round of about 10 ms at least
    rounds = max(min_rounds, min(200, int(budget_s / max(one_round * inner, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = _clock()
            for _ in range(inner):
                fn()
            times[name].append((_clock() - t0) / inner)
    return times


def _time_cuda(fns: dict[str, Callable[[], object]], reps: int = 50) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up: Triton compiles, cuBLAS picks algorithms
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    for _ in range(5):
        for name, fn in fns.items():
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(begin.elapsed_time(end) / 1e3 / reps)
    return times


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 2)


def _ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return round(statistics.median(a / b for a, b in zip(times[num], times[den])), 3)


def grid_cell(num_tokens, num_adapters, d_in, d_out, rank, device, budget_s) -> dict:
    """One cell of the issue's grid: base GEMM, PEFT-style loop, torch path (+ Triton on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.float16
    x = torch.randn(num_tokens, d_in, generator=gen).to(device, dtype)
    W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(device, dtype)
    A = (torch.randn(num_adapters, rank, d_in, generator=gen) / d_in**0.5).to(device, dtype)
    B = (torch.randn(num_adapters, d_out, rank, generator=gen) / rank**0.5).to(device, dtype)
    y = torch.zeros(num_tokens, d_out, device=device, dtype=dtype)
    slots = _slots(num_tokens, num_adapters)
    names = slots.tolist()
    meta = LoRAMeta.build(slots, num_adapters, device=device)
    fns = {
        "base_gemm": lambda: torch.mm(x, W.t(), out=y),
        "peft_loop": lambda: peft_style(y, x, A, B, names, 0.5),
        "torch": lambda: add_lora(y, x, A, B, meta, 0.5, backend="torch"),
    }
    if device == "cuda":
        fns["triton"] = lambda: add_lora(y, x, A, B, meta, 0.5, backend="triton")
        times = _time_cuda(fns)
    else:
        times = _time_cpu(fns, budget_s)
    row = dict(
        device=device, dtype=str(dtype).removeprefix("torch."), tokens=num_tokens, adapters=num_adapters,
        active_adapters=len(meta.active_slots_host), rank=rank, d_in=d_in, d_out=d_out,
        torch_strategy=torch_ops.plan(meta),
    )  # fmt: skip
    row.update({f"{name}_us": _median_us(t) for name, t in times.items()})
    row["torch_speedup_vs_peft"] = _ratio(times, "peft_loop", "torch")
    row["torch_over_base"] = _ratio(times, "torch", "base_gemm")
    if "triton" in times:
        row["triton_speedup_vs_peft"] = _ratio(times, "peft_loop", "triton")
        row["triton_over_base"] = _ratio(times, "triton", "base_gemm")
    return row


def engine_decode_cell(num_tokens, num_adapters, rank, budget_s) -> dict:
    """One SmolLM2 layer's four LoRA calls per decode step (CPU, fp32), ours vs PEFT-style."""
    gen = torch.Generator().manual_seed(1)
    S = 8  # slots the engine stacks; num_adapters of them are used this step
    h, kv, inter = SMOL_HIDDEN, SMOL_KV, SMOL_INTER

    def stack(n_out, n_in, n_slices=1):
        A = torch.randn(S, n_slices * rank, n_in, generator=gen) / n_in**0.5
        B = torch.randn(S, n_out, rank, generator=gen) / rank**0.5
        return A, B

    x = torch.randn(num_tokens, h, generator=gen)
    x_inter = torch.randn(num_tokens, inter, generator=gen)
    qkv, o, gate_up, down = stack(h + 2 * kv, h, 3), stack(h, h), stack(2 * inter, h, 2), stack(h, inter)
    y_qkv, y_o = torch.zeros(num_tokens, h + 2 * kv), torch.zeros(num_tokens, h)
    y_gu, y_down = torch.zeros(num_tokens, 2 * inter), torch.zeros(num_tokens, h)
    W = [torch.randn(n_out, n_in, generator=gen) / n_in**0.5 for n_out, n_in in ((h + 2 * kv, h), (h, h), (2 * inter, h), (h, inter))]
    scale = torch.full((S,), 2.0)
    slots = _slots(num_tokens, num_adapters, seed=num_tokens)
    names = slots.tolist()
    meta = LoRAMeta.build(slots, S)
    no_lora = LoRAMeta.build(torch.full((num_tokens,), -1), S)

    def ours(m):
        add_lora_packed(y_qkv, x, *qkv, m, scale, (h, kv, kv))
        add_lora(y_o, x, *o, m, scale)
        add_lora_packed(y_gu, x, *gate_up, m, scale, (inter, inter))
        add_lora(y_down, x_inter, *down, m, scale)

    def peft():
        peft_style(y_qkv, x, *qkv, names, 2.0, (h, kv, kv))
        peft_style(y_o, x, *o, names, 2.0)
        peft_style(y_gu, x, *gate_up, names, 2.0, (inter, inter))
        peft_style(y_down, x_inter, *down, names, 2.0)

    def base():
        torch.mm(x, W[0].t(), out=y_qkv)
        torch.mm(x, W[1].t(), out=y_o)
        torch.mm(x, W[2].t(), out=y_gu)
        torch.mm(x_inter, W[3].t(), out=y_down)

    fns = {
        "base_layer": base,
        "peft_layer": peft,
        "ours_layer": lambda: ours(meta),
        "ours_layer_no_adapter": lambda: ours(no_lora),
        "meta_build": lambda: LoRAMeta.build(slots, S),
    }
    times = _time_cpu(fns, budget_s)
    row = dict(tokens=num_tokens, adapters=num_adapters, rank=rank, torch_strategy=torch_ops.plan(meta))
    row.update({f"{name}_us": _median_us(t) for name, t in times.items()})
    row["speedup_vs_peft"] = _ratio(times, "peft_layer", "ours_layer")
    row["ours_over_base"] = _ratio(times, "ours_layer", "base_layer")
    row["peft_over_base"] = _ratio(times, "peft_layer", "base_layer")
    row["ours_per_step_30_layers_ms"] = round(row["ours_layer_us"] * 30 / 1e3 + row["meta_build_us"] / 1e3, 3)
    return row


_BACKEND_STACKS: dict = {}  # backend_cell's weights, built once


def backend_cell(num_tokens: int, num_adapters: int, budget_s: float) -> dict:
    """One SmolLM2 step's LoRA work (every layer's four projection groups), native vs torch."""
    from kernels import native_ops

    _stacks = _BACKEND_STACKS
    groups = ((SMOL_HIDDEN, (SMOL_HIDDEN, SMOL_KV, SMOL_KV)), (SMOL_HIDDEN, (SMOL_HIDDEN,)),
              (SMOL_HIDDEN, (SMOL_INTER, SMOL_INTER)), (SMOL_INTER, (SMOL_HIDDEN,)))
    if not _stacks:  # built once: ~160 MB of A and B (8 slots, 30 layers)
        g = torch.Generator().manual_seed(0)
        for layer in range(SMOL_LAYERS):
            for k, (d_in, slices) in enumerate(groups):
                A = torch.randn(8, len(slices) * 16, d_in, generator=g) * 0.01
                B = (torch.randn(8, 16, sum(slices), generator=g) * 0.01).transpose(1, 2)  # the engine's layout
                _stacks[(layer, k)] = (A, B, slices)
    slots = _slots(num_tokens, num_adapters)
    meta = LoRAMeta.build(slots, 8)
    xs = {d: torch.randn(num_tokens, d) for d in (SMOL_HIDDEN, SMOL_INTER)}
    ys = {key: torch.zeros(num_tokens, sum(sl)) for key, (_, _, sl) in _stacks.items()}

    def step(backend: str) -> Callable[[], None]:
        def run() -> None:
            for key, (A, B, slices) in _stacks.items():
                add_lora_packed(ys[key], xs[A.shape[2]], A, B, meta, 2.0, slices, backend=backend)
        return run

    fns = {"torch": step("torch")}
    if native_ops.library() is not None:
        fns["native"] = step("native")
    times = _time_cpu(fns, budget_s, min_rounds=3)
    out = {"tokens": num_tokens, "adapters": num_adapters, "units": "ms per step",
           **{f"{k}_ms": round(_median_us(v) / 1e3, 2) for k, v in times.items()}}
    if "native" in times:
        A, B, slices = _stacks[(0, 0)]
        out["native_covers"] = native_ops.covers(ys[(0, 0)], xs[SMOL_HIDDEN], A, B, meta, 2.0, slices)
        out["torch_over_native"] = round(_ratio(times, "torch", "native"), 2)
    return out


def strategy_cell(num_tokens, num_adapters, d_in, d_out, budget_s) -> dict:
    """The candidate CPU strategies on one projection (S = 8 slots, r = 16, fp32), against ours."""
    gen = torch.Generator().manual_seed(2)
    S, rank = 8, 16
    x = torch.randn(num_tokens, d_in, generator=gen)
    A = torch.randn(S, rank, d_in, generator=gen) / d_in**0.5
    B = torch.randn(S, d_out, rank, generator=gen) / rank**0.5
    y = torch.zeros(num_tokens, d_out)
    slots = _slots(num_tokens, num_adapters, seed=3)
    names = slots.tolist()
    meta = LoRAMeta.build(slots, S)
    fns = {"ours": lambda: add_lora(y, x, A, B, meta, 0.5, backend="torch")}
    want = add_lora(torch.zeros_like(y), x, A, B, meta, 0.5, backend="torch")
    for name, fn in STRATEGIES.items():
        if fn is None:
            fns[name] = lambda: peft_style(y, x, A, B, names, 0.5)
            continue
        got = fn(torch.zeros_like(y), x, A, B, slots, 0.5)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), f"strategy {name} disagrees with ours"
        fns[name] = lambda fn=fn: fn(y, x, A, B, slots, 0.5)
    times = _time_cpu(fns, budget_s)
    row = dict(tokens=num_tokens, adapters=num_adapters, d_in=d_in, d_out=d_out, ours_strategy=torch_ops.plan(meta))
    row.update({f"{name}_us": _median_us(t) for name, t in times.items()})
    return row


def _summary(grid: list[dict]) -> dict:
    cpu = [r for r in grid if r["device"] == "cpu"]
    out = {}
    if cpu:
        out["cpu_min_speedup_vs_peft"] = min(r["torch_speedup_vs_peft"] for r in cpu)
        multi = [r["torch_speedup_vs_peft"] for r in cpu if r["active_adapters"] >= 8]
        out["cpu_min_speedup_vs_peft_at_8plus_adapters"] = min(multi) if multi else None
        out["cpu_goal_at_least_as_fast_everywhere"] = out["cpu_min_speedup_vs_peft"] >= 1.0
        out["cpu_goal_2x_at_8plus_adapters"] = bool(multi) and min(multi) >= 2.0
    gpu = [r for r in grid if r["device"] == "cuda"]
    if gpu:
        at_64x32 = [r for r in gpu if r["tokens"] == 64 and r["adapters"] == 32]
        out["gpu_triton_speedup_vs_peft_at_64_tokens_32_adapters"] = {
            f"{r['d_in']}x{r['d_out']}": r["triton_speedup_vs_peft"] for r in at_64x32
        }
        out["gpu_goal_3x_at_64_tokens_32_adapters"] = bool(at_64x32) and all(
            r["triton_speedup_vs_peft"] >= 3.0 for r in at_64x32
        )
        big = [r for r in gpu if r["tokens"] == 256 and r["d_in"] == 4096]
        out["gpu_triton_over_base_T256_d4096"] = {
            f"{r['d_in']}x{r['d_out']}, {r['adapters']} adapters": r["triton_over_base"] for r in big
        }
        out["gpu_goal_lora_within_15pct_of_base_T256_d4096"] = bool(big) and all(
            r["triton_over_base"] <= 0.15 for r in big
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset of each section (seconds)")
    parser.add_argument(
        "--sections", default="grid,engine_decode,backends,strategies",
        help="comma-separated sections to run (default: all)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per CPU cell (default 1.0)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, steadier on a shared machine "
        "(use it with --threads 1, since idle-spinning worker threads count as CPU time)",
    )
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU rows (GPU machines)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = time.process_time if args.clock == "cpu" else time.perf_counter

    tokens, adapters, dims = GRID_TOKENS, GRID_ADAPTERS, GRID_DIMS
    decode = [(t, a, r) for r in DECODE_RANKS for t in DECODE_TOKENS for a in DECODE_ADAPTERS]
    strategy_cells = [(t, a, d_in, d_out) for d_in, d_out in STRATEGY_DIMS for t, a in STRATEGY_CELLS]
    backend_cells = [(t, a) for t in BACKEND_TOKENS for a in (1, 8)]
    if args.quick:
        backend_cells = [(16, 8)]
        tokens, adapters, dims = (1, 16), (1, 8), ((576, 576),)
        decode = [(16, 8, 16)]
        strategy_cells = [(16, 8, 576, 1536)]
    devices = ([] if args.no_cpu else ["cpu"]) + (["cuda"] if torch.cuda.is_available() else [])

    sections = set(args.sections.split(","))
    unknown = sections - {"grid", "engine_decode", "backends", "strategies"}
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from grid, engine_decode, backends, strategies")
    if "backends" not in sections:
        backend_cells = []
    if "grid" not in sections:
        devices = []
    if "engine_decode" not in sections:
        decode = []
    if "strategies" not in sections:
        strategy_cells = []
    grid = []
    for device in devices:
        for d_in, d_out in dims:
            # the GPU goal is stated at 64 tokens x 32 adapters
            for num_tokens in sorted(set(tokens) | ({64} if device == "cuda" and not args.quick else set())):
                for num_adapters in adapters:
                    print(f"grid {device} T={num_tokens} adapters={num_adapters} {d_in}x{d_out}", file=sys.stderr)
                    grid.append(grid_cell(num_tokens, num_adapters, d_in, d_out, GRID_RANK, device, args.budget))
    engine, strategies, backends = [], [], []
    if not args.no_cpu:
        for num_tokens, num_adapters in backend_cells:
            print(f"backends T={num_tokens} adapters={num_adapters}", file=sys.stderr)
            backends.append(backend_cell(num_tokens, num_adapters, args.budget))
        for num_tokens, num_adapters, rank in decode:
            print(f"engine_decode T={num_tokens} adapters={num_adapters} r={rank}", file=sys.stderr)
            engine.append(engine_decode_cell(num_tokens, num_adapters, rank, args.budget))
        for num_tokens, num_adapters, d_in, d_out in strategy_cells:
            print(f"strategies T={num_tokens} adapters={num_adapters} {d_in}x{d_out}", file=sys.stderr)
            strategies.append(strategy_cell(num_tokens, num_adapters, d_in, d_out, args.budget))

    report = dict(
        machine=dict(
            python=platform.python_version(), torch=torch.__version__, processor=platform.processor() or platform.machine(),
            cpu_threads=torch.get_num_threads(),
            cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        ),
        units="microseconds per call (median over interleaved rounds); ratios are medians of per-round ratios",
        clock="cuda events" if args.no_cpu else args.clock,
        grid=grid,
        engine_decode=engine,
        backends=backends,
        strategies=strategies,
        summary=_summary(grid),
    )  # fmt: skip
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
