"""``coe bench ttft``: what routing adds to time-to-first-token (``model: auto`` vs the same expert named).

For every prompt (the experts' own examples from the config), the benchmark first asks
``/v1/route`` which expert ``auto`` picks, then times streamed chat requests with
``model="auto"`` and with ``model=<that expert>`` (ABBA order, so drift on a shared CPU cancels
out). Both do the same generation work on the same adapter; the difference is the decision
(rules + router). TTFT is measured by the client, from sending the request to the first
content delta, over real HTTP on loopback.

It starts a server in-process on 127.0.0.1 (training the router if it is missing) unless
``--url`` points at a running one. Prints a JSON object (and writes it with ``--json``)::

    coe bench ttft --config experts.yaml --requests 50 --json ttft.json

Keys: ``ttft_auto_p50_ms``, ``ttft_explicit_p50_ms``, ``overhead_p50_ms`` (difference of the
p50s, the goal is <= 15 ms), ``overhead_paired_p50_ms`` (median of per-pair differences),
p95s, ``route_p50_ms`` (server-side decision time) and the setup.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _ttft(client: Any, url: str, model: str, text: str, max_tokens: int) -> float:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.0,
            "messages": [{"role": "user", "content": text}]}
    t0 = time.perf_counter()
    with client.stream("POST", url + "/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"{model}: HTTP {resp.status_code}: {resp.text[:300]}")
        lines = resp.iter_lines()
        for line in lines:
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']}")
            if any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                elapsed = time.perf_counter() - t0
                break
        else:
            raise RuntimeError(f"{model}: the stream ended without content (max_tokens too small?)")
        for _ in lines:  # drain, so the next request starts on an idle server
            pass
    return elapsed


def run(url: str, prompts: list[str], requests: int, max_tokens: int, api_key: str | None, warmup: int = 3) -> dict[str, Any]:
    """Time ``requests`` auto/explicit pairs against the server at ``url`` (``.../v1``)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=300, headers=headers) as client:
        routed: list[tuple[str, str]] = []
        route_ms: list[float] = []
        for text in prompts:
            r = client.post(url + "/route", json={"text": text})
            r.raise_for_status()
            d = r.json()
            route_ms.append(d["latency_ms"])
            routed.append((text, d["model"]))
        for i in range(warmup):
            text, expert = routed[i % len(routed)]
            _ttft(client, url, "auto", text, max_tokens)
            _ttft(client, url, expert, text, max_tokens)
        auto, explicit, pairs = [], [], []
        for i in range(requests):
            text, expert = routed[i % len(routed)]
            if i % 2 == 0:
                a = _ttft(client, url, "auto", text, max_tokens)
                e = _ttft(client, url, expert, text, max_tokens)
            else:
                e = _ttft(client, url, expert, text, max_tokens)
                a = _ttft(client, url, "auto", text, max_tokens)
            auto.append(a * 1000)
            explicit.append(e * 1000)
            pairs.append((a - e) * 1000)
    experts = sorted({e for _, e in routed})
    return {
        "requests": requests,
        "max_tokens": max_tokens,
        "prompts": len(prompts),
        "experts_routed": experts,
        "ttft_auto_p50_ms": round(_pct(auto, 0.5), 2),
        "ttft_explicit_p50_ms": round(_pct(explicit, 0.5), 2),
        "overhead_p50_ms": round(_pct(auto, 0.5) - _pct(explicit, 0.5), 2),
        "overhead_paired_p50_ms": round(statistics.median(pairs), 2),
        "ttft_auto_p95_ms": round(_pct(auto, 0.95), 2),
        "ttft_explicit_p95_ms": round(_pct(explicit, 0.95), 2),
        "route_p50_ms": round(_pct(route_ms, 0.5), 3),
        "route_p95_ms": round(_pct(route_ms, 0.95), 3),
        "goal_overhead_p50_ms": 15.0,
    }


def _prompts(cfg: Any, limit: int = 24) -> list[str]:
    """Round-robin over the experts' examples, so every expert is exercised."""
    per = [list(e.examples) + [t for ts in e.topics.values() for t in ts] for e in cfg.experts]
    out: list[str] = []
    i = 0
    while len(out) < limit and any(i < len(p) for p in per):
        out += [p[i] for p in per if i < len(p)]
        i += 1
    return out[:limit]


def main(args: argparse.Namespace) -> int:
    """Entry point of ``coe bench ttft``."""
    from coe.config import load_config

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request would drown the output
    cfg = load_config(args.config)
    prompts = _prompts(cfg)
    if not prompts:
        from coe.errors import ConfigError

        raise ConfigError(f"{args.config}: the experts have no examples to use as prompts")
    requests = int(args.requests)
    max_tokens = int(getattr(args, "max_tokens", 1) or 1)
    api_key = os.environ.get("COE_API_KEY", "").split(",")[0].strip() or (cfg.serving.api_keys[0] if cfg.serving.api_keys else None)
    setup: dict[str, Any] = {"config": str(cfg.source_path), "router": cfg.router.type,
                             "backend": cfg.base_model.backend, "base_model": cfg.base_model.served_id,
                             "machine": f"{platform.machine()} {os.cpu_count()} cpus", "python": platform.python_version(),
                             # a shared CPU makes every number noisy: record how busy it was
                             "loadavg_1m_before": round(os.getloadavg()[0], 2)}
    url = getattr(args, "url", None)
    if url:
        result = run(url.rstrip("/"), prompts, requests, max_tokens, api_key)
    else:
        import threading

        import uvicorn

        from coe.pipeline import Pipeline
        from coe.server.app import create_app

        print("bench ttft: loading the pipeline (trains the router if missing)...", file=sys.stderr, flush=True)
        pipeline = Pipeline.from_config(cfg, train_router_if_missing=True)
        app = create_app(cfg, pipeline=pipeline)
        import socket

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the benchmark server failed to start")
            time.sleep(0.05)
        try:
            print(f"bench ttft: {requests} auto/explicit pairs...", file=sys.stderr, flush=True)
            result = run(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", prompts, requests, max_tokens, api_key)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            pipeline.shutdown(0)
    setup["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    result["setup"] = setup
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0
