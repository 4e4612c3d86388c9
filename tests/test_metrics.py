"""Deferred metric updates: after a fold, /metrics must read exactly as if every update
had gone straight to the Prometheus objects, in one process and in multiprocess mode."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from tafe import metrics
from tafe.metrics import Deferred, Immediate, Metrics

# Latencies and prices that land in every bucket, on bucket bounds, beyond the last one, and zero.
LATENCIES = [0.0, *metrics.LATENCY_BUCKETS, 2.5, *(random.Random(7).uniform(0, 0.3) for _ in range(500))]
PRICES = [0.0, *metrics.PRICE_BUCKETS, 99.0, *(random.Random(8).uniform(0, 12) for _ in range(500))]


def drive(m: Metrics) -> None:
    """The request path's updates, through ``m.updates`` (as the handlers make them)."""
    u = m.updates
    latency = {r: u.histogram(m.latency.labels(r)) for r in ("bid", "ping")}
    price = u.histogram(m.bid_price)
    ok, bids, in_flight = u.counter(m.requests.labels("bid", "200")), u.counter(m.bids.labels("adx")), u.gauge(m.in_flight)
    for i, value in enumerate(LATENCIES):
        in_flight.inc()
        latency["bid" if i % 3 else "ping"].observe(value)
        ok.inc()
        bids.inc(2)
        if i % 5 == 0:
            in_flight.dec()
    for value in PRICES:
        price.observe(value)


def exposition_of(deferred: bool) -> bytes:
    m = Metrics(CollectorRegistry(), deferred=deferred)
    drive(m)
    m.updates.fold()
    return generate_latest(m.registry)


def without_created(text: bytes) -> list[str]:
    return sorted(line for line in text.decode().splitlines() if "_created" not in line)


def test_a_fold_exposes_what_immediate_updates_expose():
    immediate, deferred = exposition_of(False), exposition_of(True)
    assert 'tafe_bids_total{exchange="adx"} ' + str(2.0 * len(LATENCIES)) in immediate.decode()
    assert without_created(deferred) == without_created(immediate)


def test_nothing_shows_before_the_fold_and_a_second_fold_adds_nothing():
    m = Metrics(CollectorRegistry(), deferred=True)
    counter = m.updates.counter(m.requests.labels("bid", "204"))
    counter.inc()
    assert m.registry.get_sample_value("tafe_http_requests_total", {"route": "bid", "status": "204"}) == 0
    m.updates.fold()
    m.updates.fold()
    assert m.registry.get_sample_value("tafe_http_requests_total", {"route": "bid", "status": "204"}) == 1


def test_a_fold_is_due_once_its_period_has_passed():
    updates = Deferred(period_s=0.0)
    assert updates.due <= time.monotonic()
    assert Immediate().due == float("inf")  # the request path never folds for nothing


WRITER = """
import sys
sys.path[:0] = {path!r}
from prometheus_client import CollectorRegistry
from tafe.metrics import Metrics
import test_metrics
m = Metrics(CollectorRegistry(), deferred={deferred})
test_metrics.drive(m)
m.updates.fold()
"""


def test_folds_reach_the_multiprocess_files_like_immediate_updates(tmp_path: Path):
    """The pre-forked node's scrape reads the workers' mmap files: a fold must write
    there exactly what direct updates write."""
    results = []
    for deferred in (False, True):
        directory = tmp_path / str(deferred)
        directory.mkdir()
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
        code = WRITER.format(path=[str(Path(__file__).parent), *sys.path], deferred=deferred)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        try:
            body, _ = metrics.exposition(None)  # type: ignore[arg-type]
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        results.append(without_created(body))
    assert any(line.startswith("tafe_bid_price_cpm_bucket") for line in results[0])
    assert results[1] == results[0]
