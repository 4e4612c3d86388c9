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
import math
import os
import sys
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
PRICE_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 50.0)


class Metrics:
    """Every TAFE metric, in ``registry``; ``updates`` is how the request path changes them
    (``Deferred`` where requests cannot preempt each other, see ``cooperative``)."""

    def __init__(self, registry: CollectorRegistry, *, deferred: bool = False) -> None:
        self.registry = registry
        self.updates: Immediate | Deferred = Deferred() if deferred else Immediate()
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
        self.privacy = Counter(
            "tafe_privacy_total", "Bid requests the privacy rules restricted: decision no_bid (may not bid) or no_history"
            " (scored from the request alone), by reason", ["decision", "reason"], registry=registry,
        )  # fmt: skip
        self.bid_price = Histogram(
            "tafe_bid_price_cpm", "Price of bids returned, CPM in the bid currency", buckets=PRICE_BUCKETS, registry=registry
        )
        self.over_deadline = Counter(
            "tafe_requests_over_deadline_total", "Bid requests whose tmax budget ran out before a bid was sent", registry=registry
        )
        self.model_info = Gauge(
            "tafe_cqs_active_info", "Active CQS model, store and shading table versions (value 1)", ["kind", "version"], registry=registry,
            multiprocess_mode="livemax",
        )
        self.notices = Counter(
            "tafe_notices_total", "Win, billing, loss, impression and click notices, by kind and outcome (accepted, duplicate or"
            " why refused)", ["kind", "outcome"], registry=registry,
        )  # fmt: skip
        # Money, per campaign, in the bid currency, as the worker's last sync with the
        # money state saw it (about once a second); the most recent worker's value wins.
        def money(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, ["campaign"], registry=registry, multiprocess_mode="livemostrecent")

        self.campaign_budget = money("tafe_campaign_budget", "Budget of the current period")
        self.campaign_spend = money("tafe_campaign_spend", "Spend committed in the current period (billing notices)")
        self.campaign_reserved = money("tafe_campaign_reserved", "Budget reserved by bids awaiting their notices")
        self.campaign_left = money("tafe_campaign_budget_left", "Budget neither spent, reserved nor floated to a worker")
        self.campaign_pacing = money("tafe_campaign_pacing_rate", "Even pacing: spend allowed per second now")
        self.money_errors = Counter("tafe_money_state_errors_total", "Failed calls to the money state, by call", ["call"], registry=registry)
        self.answers_held = Counter(
            "tafe_answers_held_total", "Answers held to leave together with others (send_batch_us)", registry=registry
        )
        self.answer_batches = Counter(
            "tafe_answer_batches_total", "Sends of held answers together; answers held over batches is the mean batch size",
            registry=registry,
        )
        self.worker_restarts = worker_restarts(registry)


def cooperative() -> bool:
    """True when request handlers cannot preempt one another: gevent has patched
    ``threading``, so they are greenlets of one thread that switch only where they wait."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("threading")


class Immediate:
    """The request path updates the Prometheus metrics themselves: right for any host."""

    due = math.inf  # the request path never folds; scrapes and exits fold running totals

    def __init__(self) -> None:
        self._totals: list[_Total] = []

    def counter(self, child: Any) -> Any:
        return child

    histogram = gauge = counter

    def total(self, child: Any, read: Callable[[], int]) -> None:
        """Count in ``child`` what ``read()``, a running total kept elsewhere, grows by."""
        self._totals.append(_Total(child, read))

    def fold(self) -> None:
        for total in self._totals:
            total.fold()


class Deferred:
    """The request path counts in plain numbers; ``fold`` moves them into the metrics.

    Each Prometheus update takes a lock (gevent's, once patched): 1-2.5 us apiece, and a
    bid request made eight of them, ~12 us of its ~150 us of CPU. Here an update is a
    number added in place (~0.1 us). The cost: the metric objects, and the files a
    pre-forked node's scrape merges, lag by up to ``period_s`` (1 s, well inside a
    scrape interval). The request path folds once ``due`` has passed, the admin app
    before each scrape (so one process's /metrics is exact), and ``tafe serve`` every
    period while idle. Only for cooperative hosts (``cooperative``): two threads adding
    to one number could lose a count.
    """

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.due = time.monotonic() + period_s
        self._pending: list[_Count | _Observations | _Level | _Total] = []

    def counter(self, child: Any) -> _Count:
        return self._add(_Count(child))

    def histogram(self, child: Any) -> _Observations:
        return self._add(_Observations(child))

    def gauge(self, child: Any) -> _Level:
        return self._add(_Level(child))

    def total(self, child: Any, read: Callable[[], int]) -> None:
        """Count in ``child`` what ``read()``, a running total kept elsewhere (such as a C
        object's), grows by: read at each fold, not on the request path."""
        self._add(_Total(child, read))

    def _add(self, pending: _Pending) -> _Pending:
        self._pending.append(pending)
        return pending

    def fold(self) -> None:
        self.due = time.monotonic() + self.period_s
        for pending in self._pending:
            pending.fold()


_Pending = TypeVar("_Pending", "_Count", "_Observations", "_Level", "_Total")


class _Count:
    __slots__ = ("child", "n")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.n = 0.0

    def inc(self, amount: float = 1) -> None:
        self.n += amount

    def fold(self) -> None:
        if self.n:
            n, self.n = self.n, 0.0
            self.child.inc(n)


class _Level:
    """A gauge moved by inc/dec; the fold sets the metric to the level reached."""

    __slots__ = ("child", "value")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def fold(self) -> None:
        self.child.set(self.value)


class _Total:
    """A counter kept as a running total elsewhere: the fold adds what it grew by."""

    __slots__ = ("child", "read", "seen")

    def __init__(self, child: Any, read: Callable[[], int]) -> None:
        self.child = child
        self.read = read
        self.seen = 0

    def fold(self) -> None:
        now = self.read()
        if now > self.seen:
            self.child.inc(now - self.seen)
            self.seen = now


class _Observations:
    """Bucket counts and a sum, as ``Histogram.observe`` keeps them (a value goes to the
    first bucket whose upper bound is >= it). Folding adds them to the child's own
    bucket and sum values: prometheus_client has no public bulk observe, and those
    values work alike in one process and in multiprocess mode (tests/test_metrics.py
    compares the two expositions)."""

    __slots__ = ("child", "bounds", "counts", "sum")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.bounds = list(child._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def fold(self) -> None:
        buckets, counts = self.child._buckets, self.counts
        for i, n in enumerate(counts):
            if n:
                counts[i] = 0
                buckets[i].inc(n)
        if self.sum:
            total, self.sum = self.sum, 0.0
            self.child._sum.inc(total)


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
