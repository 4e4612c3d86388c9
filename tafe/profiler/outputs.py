"""Where blocking events go besides the aggregate: a rate-limited JSON log, Prometheus.

Both run outside the tracer hook and the request path (in greenlets the profiler spawns
on demand), since log handlers and metric locks may do I/O or wait.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .aggregate import SPAN_BUCKETS, BlockEvent, RouteSpans


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
        # route -> (span counts per bucket, seconds) already added to the span histogram.
        self.folded: dict[str, tuple[list[int], float]] = {}
        self.registered = True

    def fold(self, route_spans: RouteSpans) -> None:
        """Add the sampled spans recorded since the last fold to the span histogram.

        The request path counts spans in plain ints (``RouteSpans``): a
        ``Histogram.observe`` per span takes a lock (gevent's, once patched) and cost more
        than all the rest of sampling. The price: the histogram lags by up to the fold
        period. prometheus_client has no public bulk observe, so the counts are added to
        the child's own bucket and sum values (``_buckets[i].inc(n)``, ``_sum.inc(s)``,
        what ``observe`` itself does one at a time); those values are the same objects
        in one process and in multiprocess mode, where they are the mmap files that
        /metrics of a pre-forked node merges."""
        for route, stat in list(route_spans.routes.items()):
            counts = stat.histogram()
            before, seconds = self.folded.get(route, (None, 0.0))
            if counts == before:
                continue
            child = self.spans.labels(route)
            for value, n, old in zip(child._buckets, counts, before or [0] * len(counts)):
                if n != old:
                    value.inc(n - old)
            child._sum.inc(stat.seconds - seconds)
            self.folded[route] = (counts, stat.seconds)

    def count_block(self, site: str, seconds: float) -> None:
        self.blocking.labels(site).inc()
        self.blocking_seconds.labels(site).inc(seconds)

    def close(self) -> None:
        self.registered = False
        for metric in (self.spans, self.blocking, self.blocking_seconds):
            try:
                self.registry.unregister(metric)
            except KeyError:  # pragma: no cover - already gone
                pass

    def reopen(self) -> None:
        """Register the same metrics again (a profiler started again after uninstall):
        their values carry on."""
        if not self.registered:
            for metric in (self.spans, self.blocking, self.blocking_seconds):
                self.registry.register(metric)
            self.registered = True
