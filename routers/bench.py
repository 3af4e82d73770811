"""``coe bench router``: single-message routing latency (p50/p95) and batch throughput, as JSON.

A program that prints numbers, never a test. It loads the trained router of the config
(training it first if none is saved, as ``coe serve`` does) and measures, in one run:

- ``tokenize``: the tokenizer alone, for one message (its share of ``embed``);
- ``embed``: tokenize + the body's forward pass for one message: the floor any router pays;
- ``predict_proba``: the router (embed + head + column mapping);
- ``decide``: the whole decision chain for one message (rules + router + thresholds);
- ``setfit_predict_proba``: SetFit's own ``SetFitModel.predict_proba`` (SetFit routers only),
  the slower path our router bypasses;
- throughput of ``decide_batch`` at several batch sizes.

The CPU is shared while developing, so the JSON carries the load average, each stage's
process-CPU p50 (``cpu_p50_ms``: with ``--threads 1`` it approximates the wall time on a quiet
machine) and each stage's ratio to the ``embed`` floor measured in the same run; compare
ratios, rerun when quiet.
Run: ``coe bench router --config experts.yaml --json out.json [--threads 2] [--batch-sizes 1,8,32,128]``.
To compare the float32 and int8 bodies, train a second router from a copy of the config with
the other ``router.training.quantize`` (the shipped ``experts.yaml`` uses ``int8``; the default is
``none``) and another ``router.path``, and bench it with that ``--config``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from coe.config import load_config
from coe.errors import ConfigError
from coe.types import RouteContext

# Held-out messages of varied length and kind (none of them is an example in experts.yaml).
MESSAGES = (
    "How many orders were placed in the last 7 days?",
    "List every customer from Canada with their total spend, using the customers and orders tables.",
    "Extract the name, email and company as JSON: Jane Roe (jane@acme.io) works at Acme.",
    "Convert to a JSON object with keys city and population: Oslo has about 700,000 people.",
    "A car uses 6 litres of fuel per 100 km. How much fuel for 350 km?",
    "What is 144 divided by 12?",
    "hey, what's up?",
    "Recommend a movie for a rainy Sunday afternoon with the family, something light and funny please.",
    "Write a haiku about the sea.",
    "Which products had no sales in Q3? Query the sales table.",
    "Give me a JSON record {brand, model, year} for: a 2019 Toyota Corolla.",
    "If a pizza is cut into 8 slices and 3 people each eat 2, how many slices are left?",
)


def _percentiles(wall: Sequence[float], cpu: Sequence[float]) -> dict[str, float]:
    ms, cpu_ms = np.asarray(wall) * 1000.0, np.asarray(cpu) * 1000.0
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "mean_ms": round(float(ms.mean()), 3),
        "min_ms": round(float(ms.min()), 3),
        "cpu_p50_ms": round(float(np.percentile(cpu_ms, 50)), 3),
        "n": int(len(ms)),
    }


def _time_each(fn: Callable[[str], Any], texts: Sequence[str], repeats: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds per call. With one torch thread on a busy machine, CPU time
    is close to what the wall time would be on a quiet one (the process isn't charged while
    it waits for a core)."""
    wall, cpu = [], []
    for i in range(repeats):
        t = texts[i % len(texts)]
        c0, t0 = time.process_time(), time.perf_counter()
        fn(t)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def run(chain: Any, repeats: int = 200, batch_sizes: Sequence[int] = (1, 8, 32, 128)) -> dict[str, Any]:
    """Measure ``chain`` (a ``DecisionChain`` with a router); returns the result dict."""
    router = chain.router
    texts = list(MESSAGES)
    for t in texts[:4]:  # warm-up: first calls pay allocator and kernel selection costs
        chain.decide(RouteContext(text=t))
    stages: dict[str, Callable[[str], Any]] = {}
    encoder = getattr(router, "encoder", None)
    if encoder is not None:
        # The tokenizer alone (sentence-transformers' preprocess: what `embed` runs before the forward pass).
        stages["tokenize"] = lambda t: encoder.preprocess([t])
    if hasattr(router, "embed"):
        stages["embed"] = lambda t: router.embed([t])
    stages["predict_proba"] = lambda t: router.predict_proba([t])
    stages["decide"] = lambda t: chain.decide(RouteContext(text=t))
    model = getattr(router, "model", None)
    if model is not None and hasattr(model, "predict_proba"):
        stages["setfit_predict_proba"] = lambda t: model.predict_proba([t], as_numpy=True)
    # Interleave the stages in rounds so a burst of load from other processes hits all alike.
    wall: dict[str, list[float]] = {k: [] for k in stages}
    cpu: dict[str, list[float]] = {k: [] for k in stages}
    rounds = 10
    for r in range(rounds):
        for name, fn in stages.items():
            w, c = _time_each(fn, texts[r % len(texts):] + texts[: r % len(texts)], max(1, repeats // rounds))
            wall[name] += w
            cpu[name] += c
    latency = {k: _percentiles(wall[k], cpu[k]) for k in stages}
    floor = latency.get("embed", {}).get("p50_ms")
    if floor:
        for v in latency.values():
            v["p50_vs_embed"] = round(v["p50_ms"] / floor, 3)

    throughput = {}
    for bs in batch_sizes:
        batch = [RouteContext(text=texts[i % len(texts)]) for i in range(bs)]
        chain.decide_batch(batch)
        n_batches = max(2, -(-repeats // bs))  # about `repeats` messages per batch size
        t0 = time.perf_counter()
        for _ in range(n_batches):
            chain.decide_batch(batch)
        dt = time.perf_counter() - t0
        throughput[str(bs)] = {"msgs_per_s": round(bs * n_batches / dt, 1), "ms_per_batch": round(1000 * dt / n_batches, 3)}
    return {"latency": latency, "throughput": throughput}


def main(args: argparse.Namespace) -> int:
    """Entry point of ``coe bench router``."""
    import torch

    from routers.chain import DecisionChain
    from routers.factory import load_router, train_router

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    path = Path(args.router_path) if args.router_path else cfg.router_path
    if not path.exists() and args.router_path is None:
        print(f"coe bench router: no trained router at {path}; training one first (as `coe serve` would)", file=sys.stderr)
        train_router(cfg)
    try:
        batch_sizes = tuple(int(x) for x in str(args.batch_sizes).split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers, e.g. 1,8,32") from None
    if not batch_sizes or min(batch_sizes) < 1 or args.repeats < 1:
        raise ConfigError("--batch-sizes and --repeats: expected positive integers", param="batch_sizes")
    router = load_router(path, cfg)
    chain = DecisionChain(cfg, router=router)
    load_before = os.getloadavg()
    result = run(chain, repeats=args.repeats, batch_sizes=batch_sizes)
    result["meta"] = {
        "router": router.info.kind,
        "quantize": router.info.extra.get("training", {}).get("quantize", "none"),
        "router_path": str(path),
        "experts": list(router.experts),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "repeats": args.repeats,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n", encoding="utf-8")
    return 0
