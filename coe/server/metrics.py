"""Prometheus metrics for ``GET /metrics`` (prometheus-client, one registry per app).

Counted per request: requests by endpoint, expert, routing source and HTTP status; prompt and
completion tokens; time to first token; inter-token latency; routing latency; request
duration. Read at scrape time from the pipeline: requests in flight, the engine's queue depth,
resident adapters by location (device/cpu/disk/remote), and every numeric engine statistic as
``coe_engine_<name>`` (per-key dicts such as the per-adapter ``max_queue_wait_s`` get a
``key`` label).

Each app gets its own ``CollectorRegistry`` so that several servers in one process (tests, the
remote-backend setup) never share or clash over metrics. Knows nothing about HTTP.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger("coe.server")

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The *_created series double every counter and histogram in the output and nobody reads them.
disable_created_metrics()
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0)
_ROUTE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _ScrapeCollector(Collector):
    """Values read from the pipeline when Prometheus scrapes, never cached."""

    def __init__(self, metrics: "Metrics", stats: Callable[[], dict[str, Any]], adapters: Callable[[], list[Any]]) -> None:
        self._metrics = metrics
        self._stats = stats
        self._adapters = adapters

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily("coe_requests_in_flight", "HTTP generation requests being served", value=self._metrics.in_flight)
        try:
            stats = self._stats() or {}
        except Exception:  # a scrape must never fail because the engine is busy shutting down
            logger.debug("engine stats unavailable", exc_info=True)
            stats = {}
        depth = stats.get("queue_depth", stats.get("queued", stats.get("waiting")))
        if isinstance(depth, (int, float)):
            yield GaugeMetricFamily("coe_queue_depth", "requests waiting for a batch slot", value=float(depth))
        for key, value in sorted(stats.items()):
            name = "coe_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
            if isinstance(value, dict) and value and all(_is_number(v) for v in value.values()):
                # e.g. max_queue_wait_s per adapter: one labelled series per entry
                g = GaugeMetricFamily(name, f"engine statistic {key!r} by key", labels=["key"])
                for k, v in sorted(value.items()):
                    g.add_metric([str(k)], float(v))
                yield g
            elif _is_number(value):
                yield GaugeMetricFamily(name, f"engine statistic {key!r}", value=float(value))
        try:
            adapters = self._adapters() or []
        except Exception:
            logger.debug("adapter list unavailable", exc_info=True)
            adapters = []
        by_location: dict[str, int] = {}
        for a in adapters:
            loc = str(_field(a, "location", "unknown"))
            by_location[loc] = by_location.get(loc, 0) + 1
        g = GaugeMetricFamily("coe_resident_adapters", "adapters known to the backend, by where they live", labels=["location"])
        for loc, n in sorted(by_location.items()):
            g.add_metric([loc], float(n))
        yield g


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _field(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


class Metrics:
    """The server's metrics.

    Args:
        stats: returns the engine's statistics (read at scrape time).
        adapters: returns the backend's adapter list (read at scrape time).
    """

    def __init__(self, stats: Callable[[], dict[str, Any]] = dict, adapters: Callable[[], list[Any]] = list) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "coe_requests", "finished HTTP requests", ["endpoint", "expert", "source", "status"], registry=r
        )
        self.prompt_tokens = Counter("coe_prompt_tokens", "prompt tokens processed", ["expert"], registry=r)
        self.completion_tokens = Counter("coe_completion_tokens", "tokens generated", ["expert"], registry=r)
        self.ttft = Histogram(
            "coe_time_to_first_token_seconds", "time from request arrival to the first generated text",
            ["expert"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "coe_inter_token_latency_seconds", "time between streamed text deltas", buckets=_ITL_BUCKETS, registry=r
        )
        self.route_latency = Histogram(
            "coe_route_latency_seconds", "time to decide the expert (rules + router)", buckets=_ROUTE_BUCKETS, registry=r
        )
        self.duration = Histogram(
            "coe_request_duration_seconds", "whole request time", ["endpoint"], buckets=_DURATION_BUCKETS, registry=r
        )
        self._lock = threading.Lock()
        self.in_flight = 0
        r.register(_ScrapeCollector(self, stats, adapters))

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def observe_request(self, endpoint: str, expert: str | None, source: str | None, status: int) -> None:
        self.requests.labels(endpoint, expert or "none", source or "none", str(status)).inc()

    def observe_error(self, path: str, status: int, expert: str | None = None, source: str | None = None) -> None:
        """An error answered by the exception handler (before any decision, or after it)."""
        self.observe_request(_endpoint(path), expert, source, status)

    def observe_usage(self, expert: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(expert).inc(prompt_tokens)
        self.completion_tokens.labels(expert).inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _endpoint(path: str) -> str:
    """Bound label cardinality: only known endpoints get their own label."""
    known = ("/v1/chat/completions", "/v1/completions", "/v1/route", "/v1/models", "/v1/adapters",
             "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
    return path if path in known else "other"
