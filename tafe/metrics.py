"""Prometheus metrics of one TAFE process, built on a registry passed in.

Tests build their own ``CollectorRegistry``; the server builds one per process.
Names follow Prometheus conventions (``tafe_`` prefix, base units, ``_total`` for
counters). Latency buckets are fit for a 100 ms bid deadline.

Pre-forked workers (``tafe.master``) run in Prometheus multiprocess mode: the master
sets ``PROMETHEUS_MULTIPROC_DIR`` for them (emptied at start, ``retire_worker`` when
one exits), every value lives in a per-process mmap file, and ``exposition`` merges
them so one scrape of the admin listener shows the whole machine. Gauges say how they
combine across workers (``multiprocess_mode``); ``live*`` modes drop dead workers'
values.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from typing import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
            multiprocess_mode="livemax",
        )
        self.notices = Counter("tafe_notices_total", "Win, billing, loss, impression and click notices", ["kind"], registry=registry)
        self.worker_restarts = worker_restarts(registry)


def worker_restarts(registry: CollectorRegistry | None) -> Counter:
    """Counted by the replacement worker at start-up: the master records no metrics itself."""
    return Counter(
        "tafe_worker_restarts_total", "Workers restarted after dying unasked, by cause (signal or exit code)", ["cause"],
        registry=registry,
    )


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text a scrape gets: this process's registry, or all workers' when pre-forked.

    Merging reads one mmap file per live worker plus the archive of dead ones (see
    ``retire_worker``): ~4-8 ms for two workers here. Under gevent it runs in a native
    thread of the hub's pool, so the event loop keeps serving bids meanwhile (it gets
    the GIL back at least every switch interval, 5 ms) instead of stalling for the
    whole merge (benchmarks/RESULTS.md, "Pre-forked node").
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return generate_latest(registry), CONTENT_TYPE_LATEST
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("socket"):
        import gevent

        return gevent.get_hub().threadpool.apply(_merged, (path,)), CONTENT_TYPE_LATEST
    return _merged(path), CONTENT_TYPE_LATEST


def _merged(path: str) -> bytes:
    from prometheus_client import multiprocess

    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path)
    with _dir_lock(path, fcntl.LOCK_SH):  # never half-way through a retire_worker
        return generate_latest(merged)


def retire_worker(path: str, pid: int) -> None:
    """Forget a dead worker: drop its live gauges, fold its counts into the archive.

    Without the fold every restarted worker would leave its counter and histogram
    files behind for good (they must keep counting: totals never go back), and each
    scrape would read more files. Folding is done under an exclusive lock that
    scrapes share, so no scrape sees the dead worker counted twice or not at all.
    """
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict

    multiprocess.mark_process_dead(pid, path)
    with _dir_lock(path, fcntl.LOCK_EX):
        for kind in ("counter", "histogram"):
            dead = os.path.join(path, f"{kind}_{pid}.db")
            if not os.path.exists(dead):
                continue
            archive = MmapedDict(os.path.join(path, f"{kind}_archive.db"))
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(dead):
                    total, _ = archive.read_value(key)
                    archive.write_value(key, total + value, timestamp)
            finally:
                archive.close()
            os.unlink(dead)


@contextlib.contextmanager
def _dir_lock(path: str, how: int) -> Iterator[None]:
    with open(os.path.join(path, "lock"), "a") as f:
        fcntl.flock(f, how)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
