"""The profiler in this process: chaining, uninstall, no_blocking, metrics, log, bounds."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import gevent
import greenlet
import pytest
from prometheus_client import CollectorRegistry

from tafe import profiler
from tafe.profiler.aggregate import Aggregate, BlockEvent
from tafe.profiler.stacks import format_frame
from tafe.profiler.testing import no_blocking_spans  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[2]


def line_of(marker: str) -> int:
    return next(n for n, line in enumerate(Path(__file__).read_text().splitlines(), 1) if line.endswith(marker))


def blocker(seconds: float) -> None:
    time.sleep(seconds)  # not monkey-patched here: blocks the loop  # BLOCKER


def test_chains_to_gevent_monitor_tracer_and_restores_it() -> None:
    hub = gevent.get_hub()
    old = greenlet.gettrace()
    saved = gevent.config.max_blocking_time
    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = 60  # its thread stays asleep: we query its tracer ourselves
    try:
        monitor = hub.start_periodic_monitoring_thread()  # gevent's monitor installs its own tracer
    finally:
        gevent.config.monitor_thread = False
    try:
        gevent_tracer = greenlet.gettrace()
        assert gevent_tracer is not None and gevent_tracer is not old
        prof = profiler.install(threshold_ms=5, log=False)
        assert greenlet.gettrace() not in (gevent_tracer, None)
        gevent.sleep(0)
        gevent_tracer.did_block_hub(hub)  # resets its switch counter
        assert gevent_tracer.did_block_hub(hub)  # no switch since: "blocked"
        gevent.sleep(0)
        assert not gevent_tracer.did_block_hub(hub)  # it saw the switches, through our hook
        prof.uninstall()
        assert greenlet.gettrace() is gevent_tracer
        prof.uninstall()  # idempotent
        assert greenlet.gettrace() is gevent_tracer
    finally:
        monitor.kill()
        hub.periodic_monitoring_thread = None
        gevent.config.max_blocking_time = saved
        greenlet.settrace(old)
    assert greenlet.gettrace() is old


def test_uninstall_under_a_later_tracer_keeps_the_chain() -> None:
    seen: list[str] = []
    prof = profiler.install(threshold_ms=15, log=False)
    ours = greenlet.gettrace()

    def later(event: str, args: tuple) -> None:
        seen.append(event)
        ours(event, args)

    greenlet.settrace(later)
    try:
        prof.uninstall()  # cannot unhook from under `later`: becomes a pass-through
        assert greenlet.gettrace() is later
        events = prof.aggregate.events
        gevent.spawn(blocker, 0.03).join()
        assert seen and prof.aggregate.events == events, prof.report()
    finally:
        greenlet.settrace(None)


def test_no_blocking_passes_on_cooperative_code() -> None:
    # A stall of the whole host (seen here on a shared VM) cannot be told from a block, so
    # a cooperative body gets three tries; code that blocks would fail all three.
    for attempt in range(3):
        try:
            with profiler.no_blocking(10):
                gevent.joinall([gevent.spawn(gevent.sleep, 0.03) for _ in range(5)])
                gevent.sleep(0.02)
            break
        except profiler.BlockingSpanError:
            if attempt == 2:
                raise
    assert greenlet.gettrace() is None


def test_no_blocking_fails_with_the_stack_taken_while_blocked() -> None:
    for attempt in range(3):  # a whole-host stall may keep the watchdog from sampling: three tries
        with pytest.raises(profiler.BlockingSpanError) as info:
            with profiler.no_blocking(10):
                gevent.spawn(blocker, 0.04).join()
        assert greenlet.gettrace() is None
        if "stack while blocked" in str(info.value) or attempt == 2:
            break
    message = str(info.value)
    assert f"test_profiler_inprocess.py:{line_of('# BLOCKER')} blocker" in message
    assert "stack while blocked" in message


def test_no_blocking_catches_the_span_still_open_at_exit() -> None:
    with pytest.raises(profiler.BlockingSpanError, match="blocker"):
        with profiler.no_blocking(10):
            blocker(0.03)


def test_no_blocking_does_not_hide_the_body_exception() -> None:
    with pytest.raises(KeyError):
        with profiler.no_blocking(10):
            blocker(0.03)
            raise KeyError("x")


@pytest.mark.block_limit_ms(200)  # usable here; its verdicts are tested in a pytest run below
def test_fixture_passes(no_blocking_spans) -> None:  # noqa: F811 - the imported fixture, by name
    gevent.sleep(0.02)


@pytest.mark.parametrize("conftest, verdict", [
    ('pytest_plugins = ["tafe.profiler.testing"]\n', "FAILED test_x.py::test_blocks"),
    # Without the plugin the fixture fails the test's teardown, and pytest's own set-up
    # work counts too (so the cooperative test may also fail on a very busy host).
    ("from tafe.profiler.testing import no_blocking_spans  # noqa\n", "ERROR test_x.py::test_blocks"),
])
def test_fixture_fails_a_blocking_test(tmp_path: Path, conftest: str, verdict: str) -> None:
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_x.py").write_text(
        "import time, gevent, pytest\n"
        "def test_blocks(no_blocking_spans):\n"
        "    time.sleep(0.03)\n"
        "@pytest.mark.block_limit_ms(100)\n"
        "def test_under_limit(no_blocking_spans):\n"
        "    time.sleep(0.03)\n"
        "def test_cooperative(no_blocking_spans):\n"
        "    gevent.sleep(0.03)\n"
    )
    for _ in range(3):  # the cooperative test gets three tries on a stalling host, as above
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnknownMarkWarning",
             str(tmp_path)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        if "test_cooperative" not in out.stdout.split("short test summary")[-1]:
            break
    assert verdict in out.stdout, out.stdout + out.stderr
    assert "test_under_limit" not in out.stdout.split("short test summary")[-1]
    if "plugins" in conftest:
        assert "1 failed, 2 passed" in out.stdout, out.stdout
    assert "BlockingSpanError" in out.stdout and "test_x.py:3 test_blocks" in out.stdout


def test_metrics_log_and_request_attribution(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    prof = profiler.install(threshold_ms=10, sample=1.0, registry=registry)

    def app(environ, start_response):
        gevent.sleep(0.001)
        blocker(0.025)
        start_response("200 OK", [])
        return [b"ok"]

    wrapped = profiler.middleware(app, prof)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/bid", "HTTP_X_REQUEST_ID": "req-42"}
    with caplog.at_level(logging.WARNING, logger="tafe.profiler"):
        assert gevent.spawn(wrapped, environ, lambda *a: None).get() == [b"ok"]
        gevent.sleep(0.01)  # lets the profiler's flushing greenlet run
    site = format_frame((__file__, line_of("# BLOCKER"), "blocker"))
    value = registry.get_sample_value
    assert value("tafe_eventloop_blocking_total", {"site": site}) == 1
    assert value("tafe_eventloop_blocking_seconds_total", {"site": site}) >= 0.024
    prof.fold_metrics()  # sampled spans reach the span histogram once a second, or now
    assert value("tafe_eventloop_span_seconds_count", {"route": "POST /bid"}) >= 2
    assert value("tafe_eventloop_span_seconds_bucket", {"route": "POST /bid", "le": "0.02"}) >= 1
    prof.uninstall()
    assert value("tafe_eventloop_blocking_total", {"site": site}) is None  # unregistered
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tafe.profiler"]
    lines = [line for line in lines if line["route"] != "greenlet main"]  # the test's own code, on a busy host
    assert len(lines) == 1, lines
    assert lines[0]["route"] == "POST /bid" and lines[0]["request_id"] == "req-42" and lines[0]["site"] == site
    assert lines[0]["duration_ms"] >= 24 and lines[0]["captured"] == "while_blocked"
    # Metrics are unregistered on uninstall: installing again on the same registry works.
    profiler.install(registry=registry, log=False).uninstall()


def test_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    prof = profiler.install(threshold_ms=1, log_per_second=1)
    try:
        with caplog.at_level(logging.WARNING, logger="tafe.profiler"):
            gevent.joinall([gevent.spawn(blocker, 0.002) for _ in range(40)])
            gevent.sleep(0.01)
    finally:
        prof.uninstall()
    assert prof.aggregate.events >= 40
    assert 1 <= len([r for r in caplog.records if r.name == "tafe.profiler"]) <= prof.log.burst + 1
    assert prof.log.dropped >= 40 - prof.log.burst - 1


def test_memory_is_bounded_with_many_distinct_sites() -> None:
    agg = Aggregate(max_sites=50, max_routes=4, max_stacks=3)
    for i in range(20_000):
        stack = (("app.py", 1, "main"), (f"mod{i % 5000}.py", i % 97, f"f{i}"))
        agg.add(BlockEvent(0.011 + (i % 50) / 1000, 0.0, f"GET /r{i % 30}", str(i), "g", stack, None))
    assert agg.events == 20_000
    assert len(agg.sites) == 51  # 50 sites + "(other)"
    other = agg.sites["(other)"]
    assert sum(s.count for s in agg.sites.values()) == 20_000 and other.count > 19_000
    for site in agg.sites.values():
        assert len(site.routes) <= 5 and len(site.stacks) <= 4 and len(site.buckets.counts) <= 60
    report = agg.report(top=10)
    assert len(report["top"]) == 10 and report["top"][0]["site"] == "(other)"
    assert 10 <= report["top"][0]["p50_ms"] <= 62 and report["top"][0]["max_ms"] == pytest.approx(60, abs=0.01)
    assert len(agg.collapsed().splitlines()) <= 51 * 4


def test_watchdog_restarts_in_a_forked_child() -> None:
    prof = profiler.install(threshold_ms=10, log=False)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its watchdog thread must be running again
        try:
            blocker(0.04)
            prof.close_span()
            example = prof.report()["top"][0]["example"]
            os.write(write_end, json.dumps({"pid": os.getpid(), "report_pid": prof.pid, **example}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    prof.uninstall()
    child = json.loads(data)
    assert child["report_pid"] == child["pid"] == pid
    assert child["captured"] == "while_blocked" and child["site"].endswith(f":{line_of('# BLOCKER')} blocker"), child


def test_started_again_after_uninstall_it_exports_its_metrics_again() -> None:
    registry = CollectorRegistry()
    site = format_frame((__file__, line_of("# BLOCKER"), "blocker"))
    prof = profiler.install(threshold_ms=10, registry=registry, log=False)
    try:
        for _ in range(2):
            gevent.spawn(blocker, 0.025).join()
            gevent.sleep(0.01)
            prof.uninstall()
            assert registry.get_sample_value("tafe_eventloop_blocking_total", {"site": site}) is None
            prof.start()
            assert prof.watchdog._schedstat is not None or sys.platform != "linux"
        assert registry.get_sample_value("tafe_eventloop_blocking_total", {"site": site}) == 2
    finally:
        prof.uninstall()


def test_install_twice_is_refused_but_no_blocking_nests() -> None:
    prof = profiler.install(threshold_ms=50, log=False)
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            profiler.install(threshold_ms=10, log=False)
        with pytest.raises(profiler.BlockingSpanError):
            with profiler.no_blocking(limit_ms=10):
                blocker(0.025)
        assert greenlet.gettrace() is prof.tracer.hook  # restored to the outer one
    finally:
        prof.uninstall()


def test_an_unsampled_span_seen_only_in_library_code_names_no_culprit() -> None:
    import gevent._socketcommon as sc

    in_gevent = ((sc.__file__, 687, "recv_into"),)
    in_app = ((__file__, 10, "handler"), (sc.__file__, 687, "recv_into"))
    agg = Aggregate()
    names = [
        agg.add(BlockEvent(0.012, 0.0, "GET /a", None, "g", None, in_gevent)),  # at yield, library only
        agg.add(BlockEvent(0.012, 0.0, "GET /a", None, "g", None, None)),  # no stack at all
        agg.add(BlockEvent(0.012, 0.0, "GET /a", None, "g", None, in_app)),  # at yield, in the app
        agg.add(BlockEvent(0.012, 0.0, "GET /a", None, "g", in_gevent, None)),  # sampled while blocked
    ]
    assert names == ["(not sampled)", "(not sampled)", format_frame(in_app[0]), format_frame(in_gevent[0])]


def test_a_block_just_over_the_threshold_is_sampled_while_blocked() -> None:
    # The watchdog wakes once per threshold while spans are short; one it finds already
    # a tenth of the threshold old is looked at again at half the threshold, so a block
    # of 1.4x the threshold is sampled, not only seen when it yields. Twenty blocks,
    # one more batch if the host held the watchdog off (see test_profiler_server).
    for _ in range(2):
        prof = profiler.install(threshold_ms=10, log=False)
        seen: list[BlockEvent] = []
        prof.listeners.append(seen.append)
        try:
            for _ in range(20):
                gevent.spawn(blocker, 0.014).join()
                gevent.sleep(random.uniform(0.001, 0.011))  # any phase against the wake-ups
        finally:
            prof.uninstall()
        mine = [e for e in seen if e.duration >= 0.0135]
        if len(mine) == 20 and all(e.blocked is not None for e in mine):
            break
    assert len(mine) == 20 and all(e.blocked is not None for e in mine), [(e.duration, e.blocked is not None) for e in mine]
