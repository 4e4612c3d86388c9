"""Where blocking events go besides the aggregate: a rate-limited JSON log, Prometheus.

Both run outside the tracer hook (in a greenlet the profiler spawns on demand), since
log handlers and metric locks may do I/O or wait.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .aggregate import BlockEvent

# Spans worth telling apart run from ~0.1 ms (a bid) to ~100 ms (a stall).
SPAN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 1.0)


class RateLimitedLog:
    """One JSON line per event, at most ``per_second`` on average (bursts of ``burst``);
    the next line written says how many were dropped."""

    def __init__(self, logger: logging.Logger, per_second: float = 5.0, burst: int = 20) -> None:
        self.logger = logger
        self.per_second = per_second
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.dropped = 0

    def emit(self, event: BlockEvent, site: str, threshold_s: float) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.tokens < 1:
            self.dropped += 1
            return False
        self.tokens -= 1
        record: dict[str, Any] = event.to_dict()
        record["site"] = site
        record["threshold_ms"] = threshold_s * 1000
        if self.dropped:
            record["dropped_since_last"] = self.dropped
            self.dropped = 0
        self.logger.warning(json.dumps(record, separators=(",", ":")))
        return True


class Metrics:
    """Prometheus metrics on the registry given (unregistered again on uninstall)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Histogram

        self.registry = registry
        self.spans = Histogram(
            "tafe_eventloop_span_seconds",
            "Execution spans (switch in to switch out) of sampled requests, by route",
            ["route"],
            buckets=SPAN_BUCKETS,
            registry=registry,
        )
        self.blocking = Counter(
            "tafe_eventloop_blocking_total", "Spans that held the event loop over the threshold, by code site",
            ["site"], registry=registry,
        )
        self.blocking_seconds = Counter(
            "tafe_eventloop_blocking_seconds_total", "Time the event loop was held by spans over the threshold, by code site",
            ["site"], registry=registry,
        )
        self._children: dict[str, Any] = {}

    def observe_spans(self, route: str, spans: list[float]) -> None:
        child = self._children.get(route)
        if child is None:
            child = self._children[route] = self.spans.labels(route)
        for d in spans:
            child.observe(d)

    def count_block(self, site: str, seconds: float) -> None:
        self.blocking.labels(site).inc()
        self.blocking_seconds.labels(site).inc(seconds)

    def close(self) -> None:
        for metric in (self.spans, self.blocking, self.blocking_seconds):
            try:
                self.registry.unregister(metric)
            except KeyError:  # pragma: no cover - already gone
                pass
