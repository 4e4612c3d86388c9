"""The profiler's Prometheus metrics as a scrape sees them: in one process, and summed over
pre-forked workers (``tafe serve --workers 2``: multiprocess mode, where only values of
real metric objects, written to the per-process files, reach /metrics).

Sampled spans are counted in plain ints on the request path and folded into the span
histogram at most a second later, so the scrapes here poll for a few seconds.
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import gevent
import pytest
from conftest import stop_process
from prometheus_client import CollectorRegistry

from tafe import profiler

ROOT = Path(__file__).resolve().parents[2]
BID = (ROOT / "tafe" / "data" / "demo-request.json").read_bytes()
ROUTE = 'route="POST /openrtb2/bid"'
LISTENING = re.compile(r"listening on (http://[\d.]+:\d+) \(admin (http://[\d.]+:\d+)\)")


def test_span_histogram_folds_the_sampled_spans_by_itself() -> None:
    registry = CollectorRegistry()
    prof = profiler.install(threshold_ms=60_000, sample=1.0, registry=registry, log=False)

    def app(environ, start_response):
        gevent.sleep(0)  # two spans per request at least
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = profiler.middleware(app, prof)
    value = registry.get_sample_value
    labels = {"route": "POST /bid"}
    try:
        gevent.joinall([gevent.spawn(wrapped, {"REQUEST_METHOD": "POST", "PATH_INFO": "/bid"}, lambda *a: None) for _ in range(5)])
        routes = prof.report()["sampled_routes"]
        assert routes["POST /bid"]["requests"] == 5 and routes["POST /bid"]["spans"] >= 10, routes
        deadline = time.monotonic() + 5 * profiler.profiler.FOLD_PERIOD_S
        while value("tafe_eventloop_span_seconds_count", labels) is None and time.monotonic() < deadline:
            gevent.sleep(0.05)
        count = value("tafe_eventloop_span_seconds_count", labels)
        assert count == routes["POST /bid"]["spans"]
        assert value("tafe_eventloop_span_seconds_bucket", {**labels, "le": "+Inf"}) == count
        assert value("tafe_eventloop_span_seconds_bucket", {**labels, "le": "1.0"}) == count  # spans well under 1 s
        assert value("tafe_eventloop_span_seconds_bucket", {**labels, "le": "0.001"}) <= count
        assert 0 < value("tafe_eventloop_span_seconds_sum", labels) < 1
        # More requests: the next fold adds only what is new.
        gevent.joinall([gevent.spawn(wrapped, {"REQUEST_METHOD": "POST", "PATH_INFO": "/bid"}, lambda *a: None) for _ in range(3)])
        prof.fold_metrics()
        assert value("tafe_eventloop_span_seconds_count", labels) == prof.report()["sampled_routes"]["POST /bid"]["spans"]
    finally:
        prof.uninstall()
    assert value("tafe_eventloop_span_seconds_count", labels) is None  # unregistered


def scrape(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(admin + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def bid(url: str) -> int:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:  # a new connection each: the kernel spreads them over the workers
        conn.request("POST", "/openrtb2/bid", body=BID, headers={"Content-Type": "application/json", "Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sampled_spans_reach_metrics_in_one_process_and_pre_forked(workers: int) -> None:
    cmd = [sys.executable, "-m", "tafe", "serve", "--workers", str(workers), "--port", "0", "--admin-port", "0",
           "--drain-grace-s", "0", "--block-threshold-ms", "10", "--profile-sample", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    found: list[re.Match[str]] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if not found and (m := LISTENING.search(line)) and (workers == 1 or "workers" in line):
                found.append(m)
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert ready.wait(60) and found, "".join(lines)
        url, admin = found[0].group(1), found[0].group(2)
        sent = 40
        assert all(bid(url) in (200, 204) for _ in range(sent))
        key = f"tafe_eventloop_span_seconds_count{{{ROUTE}}}"
        deadline = time.monotonic() + 10
        while (got := scrape(admin).get(key, 0.0)) < sent and time.monotonic() < deadline:
            time.sleep(0.2)
        # Each sampled request has at least one span (the one it runs in), across workers.
        assert got >= sent, "".join(lines[-40:])
        metrics = scrape(admin)
        assert metrics[f'tafe_eventloop_span_seconds_bucket{{le="+Inf",{ROUTE}}}'] == metrics[key]
        assert metrics[f"tafe_eventloop_span_seconds_sum{{{ROUTE}}}"] > 0
    finally:
        stop_process(proc)
