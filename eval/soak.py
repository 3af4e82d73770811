"""``coe soak``: many concurrent streaming clients against a real server, then a solo check.

What it does, in order:
1. starts ``coe serve`` from the config on 127.0.0.1 in a child process (unless ``--url`` points
   at a running server), so the server's memory is measured apart from the clients';
2. builds a pool of distinct requests: the experts' own examples, half with ``model: auto`` and
   half naming an expert or the base model, all greedy (``temperature: 0``);
3. runs every pooled request alone, one after the other: the reference answers (and a warm-up);
4. runs ``--clients`` streaming clients for ``--duration`` seconds, each sending pooled requests
   back to back (requests started before the deadline finish), while sampling the server's RSS;
5. compares every completed answer (text and answering expert) with its solo run.

Prints one JSON object (and writes it with ``--json``): requests ``sent``, ``completed``,
``failed`` (HTTP error, error event, transport error) and ``truncated`` (the stream ended without
a finish chunk and ``[DONE]``); ``equal_to_solo_pct`` with the first mismatches; client-side
TTFT and inter-token latency p50/p99 over the completed requests; the server's RSS over time.
Exits 1 when the goal (no failed or truncated request, every answer equal to its solo run) is
missed.

CI runs a short version on the tiny model (tests/reliability/test_soak.py); the full run is::

    coe soak --config experts.yaml --clients 64 --duration 300 --json soak.json

This module talks to the server over HTTP only; it knows nothing about the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

GREEDY_TEMPERATURE = 0.0
READY_RE = re.compile(r"ready on (http://\S+/v1)")


@dataclass(frozen=True)
class SoakRequest:
    """One distinct request of the pool."""

    model: str
    text: str


@dataclass
class Outcome:
    """What one streamed request came back with.

    ``status`` is ``completed``, ``failed`` or ``truncated``; ``token_times`` are the arrival
    times (perf_counter) of the chunks that carried text.
    """

    request: SoakRequest
    status: str
    text: str = ""
    expert: str | None = None
    finish_reason: str | None = None
    http_status: int | None = None
    error: str | None = None
    started: float = 0.0
    token_times: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- one request


async def stream_one(client: Any, url: str, req: SoakRequest, max_tokens: int) -> Outcome:
    """Send one streaming chat completion and classify how it ended.

    Args:
        client: an ``httpx.AsyncClient``.
        url: the server's ``.../v1`` URL.
        req: the request.
        max_tokens: new tokens at most.

    Returns:
        The ``Outcome``.
    """
    import httpx

    body = {"model": req.model, "stream": True, "max_tokens": max_tokens, "temperature": GREEDY_TEMPERATURE,
            "messages": [{"role": "user", "content": req.text}]}
    out = Outcome(req, "truncated", started=time.perf_counter())
    parts: list[str] = []
    done = False
    try:
        async with client.stream("POST", url + "/chat/completions", json=body) as resp:
            out.http_status = resp.status_code
            if resp.status_code != 200:
                raw = await resp.aread()
                out.status, out.error = "failed", f"HTTP {resp.status_code}: {raw[:300].decode('utf-8', 'replace')}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.status, out.error = "failed", f"error event: {chunk['error'].get('message')}"
                    return out
                if chunk.get("coe"):
                    out.expert = chunk["coe"].get("expert")
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        parts.append(content)
                        out.token_times.append(time.perf_counter())
                    if choice.get("finish_reason"):
                        out.finish_reason = choice["finish_reason"]
    except (httpx.HTTPError, ValueError) as exc:  # transport errors, or a chunk that is not JSON
        out.status, out.error = "failed", f"{type(exc).__name__}: {exc}"
        return out
    out.text = "".join(parts)
    if done and out.finish_reason is not None:
        out.status = "completed"
    else:
        out.error = "the stream ended without " + ("a finish_reason" if done else "[DONE]")
    return out


# --------------------------------------------------------------------------- the pool


def build_pool(cfg: Any, models: list[str], distinct: int) -> list[SoakRequest]:
    """``distinct`` requests: the experts' examples round-robin, every other one on ``auto``.

    Args:
        cfg: the ``CoeConfig`` whose experts' examples are the prompts.
        models: the explicit models to mix in (experts and the base model), in order.
        distinct: pool size.
    """
    per_expert = [list(e.examples) + [t for ts in e.topics.values() for t in ts] for e in cfg.experts]
    prompts: list[str] = []
    i = 0
    while len(prompts) < distinct and any(i < len(p) for p in per_expert):
        prompts += [p[i] for p in per_expert if i < len(p)]
        i += 1
    if not prompts:
        from coe.errors import ConfigError

        raise ConfigError(f"{cfg.source_path}: the experts have no examples to use as soak prompts")
    pool: dict[SoakRequest, None] = {}
    for k in range(distinct * 8):  # a small config repeats pairs: skip them, up to a bound
        model = "auto" if k % 2 == 0 or not models else models[(k // 2) % len(models)]
        pool.setdefault(SoakRequest(model, prompts[k % len(prompts)]))
        if len(pool) == distinct:
            break
    return list(pool)


# --------------------------------------------------------------------------- load phase


class RssSampler:
    """Samples a process's resident memory every ``interval_s`` on a thread."""

    def __init__(self, pid: int | None, interval_s: float) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._proc = None
        if pid is not None:
            import psutil

            self._proc = psutil.Process(pid)

    def sample(self) -> float | None:
        if self._proc is None:
            return None
        try:
            mb = self._proc.memory_info().rss / 2**20
        except Exception:  # the process is gone
            return None
        self.samples.append((round(time.perf_counter() - self._t0, 2), round(mb, 1)))
        return mb

    def __enter__(self) -> "RssSampler":
        if self._proc is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._proc is not None:
            self._thread.join(timeout=5)


async def run_load(url: str, pool: list[SoakRequest], clients: int, duration_s: float, max_tokens: int,
                   headers: dict[str, str], timeout_s: float) -> tuple[list[Outcome], float]:
    """``clients`` concurrent clients, each sending pooled requests back to back until the deadline.

    Client ``k`` starts at pool entry ``k`` and steps by ``clients``, so concurrent requests mix
    experts and ``auto``. Returns the outcomes and the wall time of the phase.
    """
    import httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    outcomes: list[Outcome] = []
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), limits=limits, headers=headers) as client:

        async def worker(k: int) -> None:
            j = k
            while time.perf_counter() < deadline:
                outcomes.append(await stream_one(client, url, pool[j % len(pool)], max_tokens))
                j += clients

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return outcomes, time.perf_counter() - t0


async def run_solo(url: str, pool: list[SoakRequest], max_tokens: int, headers: dict[str, str],
                   timeout_s: float) -> dict[SoakRequest, Outcome]:
    """Every pooled request alone, one after another."""
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=30.0), headers=headers) as client:
        return {req: await stream_one(client, url, req, max_tokens) for req in pool}


# --------------------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 2)


def summarize(outcomes: list[Outcome], solo: dict[SoakRequest, Outcome], wall_s: float) -> dict[str, Any]:
    """Counts, equality with the solo runs, and latency percentiles (see the module docstring)."""
    by_status = Counter(o.status for o in outcomes)
    done = [o for o in outcomes if o.status == "completed"]
    ttft = [o.token_times[0] - o.started for o in done if o.token_times]
    itl = [b - a for o in done for a, b in zip(o.token_times, o.token_times[1:])]
    compared = equal = 0
    mismatches = []
    for o in outcomes:
        ref = solo.get(o.request)
        if o.status != "completed" or ref is None or ref.status != "completed":
            continue
        compared += 1
        if (o.text, o.expert) == (ref.text, ref.expert):
            equal += 1
        elif len(mismatches) < 5:
            at = next((i for i, (a, b) in enumerate(zip(o.text, ref.text)) if a != b), min(len(o.text), len(ref.text)))
            mismatches.append({"model": o.request.model, "prompt": o.request.text, "solo_expert": ref.expert,
                               "load_expert": o.expert, "solo_text": ref.text, "load_text": o.text, "first_diff_char": at})
    failures = Counter((o.error or "").split(":")[0] for o in outcomes if o.status != "completed")
    tokens = sum(len(o.token_times) for o in outcomes)
    return {
        "sent": len(outcomes),
        "completed": by_status["completed"],
        "failed": by_status["failed"],
        "truncated": by_status["truncated"],
        "failure_kinds": dict(failures),
        "failure_examples": [o.error for o in outcomes if o.status != "completed"][:5],
        "compared_to_solo": compared,
        "equal_to_solo": equal,
        "equal_to_solo_pct": round(100.0 * equal / compared, 3) if compared else None,
        "mismatches": mismatches,
        "ttft_ms": {"p50": _ms(percentile(ttft, 0.5)), "p99": _ms(percentile(ttft, 0.99)), "n": len(ttft)},
        "itl_ms": {"p50": _ms(percentile(itl, 0.5)), "p99": _ms(percentile(itl, 0.99)), "n": len(itl)},
        "load_wall_s": round(wall_s, 2),
        "requests_per_s": round(len(outcomes) / wall_s, 3) if wall_s > 0 else None,
        "text_chunks_per_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
    }


# --------------------------------------------------------------------------- the server


class ServerProcess:
    """``coe serve`` in a child process on 127.0.0.1 with an OS-chosen port.

    Args:
        config: experts.yaml.
        startup_timeout_s: how long loading may take (the first start converts the GGUF and
            may train the router).
    """

    def __init__(self, config: str, startup_timeout_s: float = 900.0) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.log: deque[str] = deque(maxlen=200)
        self.url = ""
        self.exit_code: int | None = None

    def __enter__(self) -> "ServerProcess":
        cmd = [sys.executable, "-m", "coe.cli", "serve", "--config", self.config, "--host", "127.0.0.1",
               "--port", "0", "--log-level", "warning"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.pid = self.proc.pid
        found: list[str] = []
        ready = threading.Event()

        def read() -> None:  # keeps draining, so the child never blocks on a full pipe
            for line in self.proc.stdout:
                self.log.append(line.rstrip())
                m = READY_RE.search(line)
                if m and not found:
                    found.append(m.group(1))
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(self.startup_timeout_s) or not found:
            self._stop()
            raise RuntimeError("the soak server did not start:\n" + "\n".join(self.log))
        self.url = found[0]
        self.startup_s = time.perf_counter() - t0
        return self

    def _stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode

    def __exit__(self, *exc: Any) -> None:
        self._stop()


# --------------------------------------------------------------------------- entry point


async def _soak(url: str, cfg: Any, args: argparse.Namespace, headers: dict[str, str],
                rss: RssSampler) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(timeout=60, headers=headers) as client:
        r = await client.get(url + "/models")
        r.raise_for_status()
        cards = r.json()["data"]
    kinds = {c["id"]: (c.get("coe") or {}).get("kind") for c in cards}
    models = [m for m, k in kinds.items() if k in ("expert", "base")]
    pool = build_pool(cfg, models, int(args.distinct))
    timeout_s = float(args.request_timeout)
    print(f"soak: {len(pool)} distinct requests, each alone first...", file=sys.stderr, flush=True)
    rss.sample()
    t0 = time.perf_counter()
    solo = await run_solo(url, pool, args.max_tokens, headers, timeout_s)
    solo_s = time.perf_counter() - t0
    bad_solo = [o.error for o in solo.values() if o.status != "completed"]
    rss_before = rss.sample()
    print(f"soak: {args.clients} clients for {args.duration:g} s...", file=sys.stderr, flush=True)
    with rss:
        outcomes, wall = await run_load(url, pool, int(args.clients), float(args.duration), args.max_tokens, headers, timeout_s)
    rss_after = rss.sample()
    report = summarize(outcomes, solo, wall)
    report["solo"] = {"requests": len(solo), "failed": len(bad_solo), "errors": bad_solo[:5], "wall_s": round(solo_s, 2),
                      "experts_answering": dict(Counter(o.expert or "<base>" for o in solo.values()))}
    mbs = [mb for _, mb in rss.samples]
    report["rss"] = {
        "pid": rss.pid,
        "before_load_mb": None if rss_before is None else round(rss_before, 1),
        "after_load_mb": None if rss_after is None else round(rss_after, 1),
        "max_mb": max(mbs) if mbs else None,
        "growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2) if rss_before and rss_after else None,
        "samples": rss.samples,
    }
    return report


def main(args: argparse.Namespace) -> int:
    """Entry point of ``coe soak`` (see the module docstring)."""
    from coe.config import load_config

    logging.getLogger("httpx").setLevel(logging.WARNING)
    cfg = load_config(args.config)
    for name in ("clients", "distinct"):
        if int(getattr(args, name)) < 1:
            from coe.errors import ConfigError

            raise ConfigError(f"--{name}: expected a positive integer, found {getattr(args, name)}")
    api_key = os.environ.get("COE_API_KEY", "").split(",")[0].strip() or (cfg.serving.api_keys[0] if cfg.serving.api_keys else None)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    setup: dict[str, Any] = {
        "config": str(cfg.source_path), "base_model": cfg.base_model.served_id, "router": cfg.router.type,
        "experts": list(cfg.expert_names), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "python": platform.python_version(), "loadavg_1m_before": round(os.getloadavg()[0], 2),
    }
    result: dict[str, Any] = {"clients": int(args.clients), "duration_s": float(args.duration),
                              "max_tokens": int(args.max_tokens), "distinct_requests": int(args.distinct)}
    if args.url:
        url = args.url.rstrip("/")
        url = url if url.endswith("/v1") else url + "/v1"
        rss = RssSampler(getattr(args, "server_pid", None), float(args.rss_interval))
        result.update(asyncio.run(_soak(url, cfg, args, headers, rss)))
        result["server"] = {"url": url, "started_by_soak": False}
    else:
        print(f"soak: starting `coe serve --config {args.config}`...", file=sys.stderr, flush=True)
        with ServerProcess(str(args.config)) as server:
            rss = RssSampler(server.pid, float(args.rss_interval))
            result.update(asyncio.run(_soak(server.url, cfg, args, headers, rss)))
        result["server"] = {"url": server.url, "started_by_soak": True, "startup_s": round(server.startup_s, 1),
                            "exit_code_after_sigterm": server.exit_code}
    setup["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    result["setup"] = setup
    result["ok"] = (result["failed"] == 0 and result["truncated"] == 0 and result["solo"]["failed"] == 0
                    and result["sent"] > 0 and result["equal_to_solo"] == result["compared_to_solo"] == result["completed"])
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if not result["ok"]:
        print(f"soak: goal missed: {result['failed']} failed, {result['truncated']} truncated, "
              f"{result['equal_to_solo']}/{result['compared_to_solo']} equal to solo (see the JSON)", file=sys.stderr)
        return 1
    return 0
