"""Prometheus metrics of one TAFE process, built on a registry passed in.

Tests build their own ``CollectorRegistry``; the server builds one per process.
Names follow Prometheus conventions (``tafe_`` prefix, base units, ``_total`` for
counters). Latency buckets are fit for a 100 ms bid deadline.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
PRICE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 50.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "tafe_http_requests_total", "HTTP requests answered, by route and status", ["route", "status"], registry=registry
        )
        self.latency = Histogram(
            "tafe_http_request_duration_seconds",
            "Time from request arrival to response written, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "tafe_http_requests_in_flight", "Requests being served now", registry=registry, multiprocess_mode="livesum"
        )
        self.bad_requests = Counter(
            "tafe_bad_requests_total", "Requests refused as malformed, by reason", ["reason"], registry=registry
        )
        self.bids = Counter("tafe_bids_total", "Bids returned (one per imp bid on), by exchange", ["exchange"], registry=registry)
        self.no_bids = Counter("tafe_no_bids_total", "Bid requests answered with no bid, by reason", ["reason"], registry=registry)
        self.bid_price = Histogram(
            "tafe_bid_price_cpm", "Price of bids returned, CPM in the bid currency", buckets=PRICE_BUCKETS, registry=registry
        )
        self.over_deadline = Counter(
            "tafe_requests_over_deadline_total", "Bid requests whose tmax budget ran out before a bid was sent", registry=registry
        )
        self.model_info = Gauge(
            "tafe_cqs_active_info", "Active CQS model and store versions (value 1)", ["kind", "version"], registry=registry,
            multiprocess_mode="max",
        )
        self.notices = Counter("tafe_notices_total", "Win, billing, loss, impression and click notices", ["kind"], registry=registry)
