"""Smoke tests of the benchmark harness: it runs end to end and measures what it claims.

No speed is asserted: only that the harness works, and that the open-loop client counts
a server's stall in the latency of every request that was due during it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TVG = BENCH / "threads_vs_greenlets"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402


def test_percentiles_and_summary():
    data = list(range(1, 101))
    assert common.percentile(data, 50) == 50.5
    assert common.percentile(data, 99) == 99.01
    assert common.percentile([7.0], 99.9) == 7.0
    s = common.summarize(reversed(data))
    assert (s["p50"], s["max"], s["n"]) == (50.5, 100.0, 100.0)


def test_record_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    common.record("a", "first A", path)
    common.record("b", "only B", path)
    common.record("a", "second A", path)
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.index("second A") < text.index("only B")


def test_open_loop_client_charges_a_stall_to_every_request_due_during_it(tmp_path):
    """One connection to a server taking 100 ms per answer, offered 50 req/s for 1 s.

    A closed-loop client would report ~100 ms for every request; measured from the
    intended send times, requests queue behind each other and the tail grows to seconds.
    """
    port = common.free_port()
    upstream = common.start(
        [sys.executable, str(TVG / "upstream.py"), "--port", str(port), "--median-ms", "100", "--sigma", "0"],
        tmp_path / "upstream.log",
    )
    try:
        common.wait_port(port, proc=upstream)
        code = (
            "r = openloop.run(int(sys.argv[2]), b'GET /user/1 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n', rate=50, duration_s=1.0,"
            " warmup_s=0.0, connections=1, arrivals='fixed')\n"
            "print(json.dumps({'lat': r.latencies_ms, 'statuses': r.statuses, 'errors': r.errors}))\n"
        )
        result = _in_gevent_process(code, port)
    finally:
        common.stop(upstream)
    lat = sorted(result["lat"])
    assert result["statuses"] == {"200": 50} and not result["errors"]
    assert lat[0] >= 95  # the server's own 100 ms
    assert lat[-1] > 2000  # the 50th request was due at 1 s and answered at ~5 s


def test_poisson_schedule_and_lookup_times_are_the_same_for_every_server():
    """Arrivals and upstream delays are seeded properties of the request sequence, not of the run."""
    code = (
        "import upstream, common\n"
        "a, b, c = (openloop.schedule(1000, 20, 'poisson', seed=s) for s in (0, 0, 1))\n"
        "gaps = sorted(y - x for x, y in zip(a, a[1:]))\n"
        "d = [upstream.delay_ms('u%07d' % i) for i in range(8192)]\n"
        "print(json.dumps({'same': a == b, 'other': a != c, 'n': len(a), 'gap_p50': common.percentile(gaps, 50),"
        " 'fixed': openloop.schedule(4, 1, 'fixed'), 'delay': common.summarize(d), 'again': upstream.delay_ms('u0000007'),"
        " 'first': d[7], 'constant': upstream.delay_ms('u1', 5.0, 0.0)}))\n"
    )
    r = _in_gevent_process(code)
    assert r["same"] and r["other"]
    assert 19000 < r["n"] < 21000  # 1000 req/s for 20 s
    assert 0.6 < r["gap_p50"] * 1000 < 0.8  # exponential gaps: median ln 2 / rate, not 1 / rate
    assert r["fixed"] == [0.0, 0.25, 0.5, 0.75]
    assert r["again"] == r["first"] and r["constant"] == 5.0
    assert 2.8 < r["delay"]["p50"] < 3.2 and 8.5 < r["delay"]["p99"] < 10.5  # lognormal, median 3 ms, sigma 0.5


def _in_gevent_process(code: str, *args: object) -> dict:
    """Run ``code`` with openloop imported (it monkey-patches, so never in the test process); its JSON output."""
    head = "import json, sys; sys.path[:0] = [%r, %r]; import openloop\n" % (str(TVG), str(BENCH))
    out = subprocess.run([sys.executable, "-c", head + code, *map(str, ("", *args))], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_threads_vs_greenlets_runs_end_to_end_on_every_server_installed(tmp_path):
    """A tiny sweep of two rates: every server answers at both, with the upstream's own row and the goal lines."""
    chart = tmp_path / "latency.png"
    servers = ["TAFE", "gunicorn gthread", "gunicorn gevent"]
    if shutil.which("apache2") and Path("/usr/lib/apache2/modules/mod_wsgi.so").exists():
        servers.append("Apache")  # CI does not install Apache: the benchmark's own setup step does, under make bench
    cmd = [sys.executable, str(TVG / "run.py"), "--rate", "30", "--rate", "60", "--duration", "1", "--warmup", "0.3"]
    cmd += ["--rounds", "1", "--reruns", "0", "--connections", "8", "--chart", str(chart), *(a for s in servers for a in ("--only", s))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "FAILED" not in out.stdout
    if "no chart: matplotlib is not installed" in out.stdout:  # the bench extra; CI installs only dev
        assert importlib.util.find_spec("matplotlib") is None
    else:
        assert chart.stat().st_size > 0
    tables = out.stdout.split("### ")[1:]
    assert [t.split(" ", 1)[0] for t in tables] == ["30", "60"]
    for t in tables:
        lines = [r for r in t.splitlines() if r.startswith("| ")]
        headers = [c.strip() for c in lines[0].strip().strip("|").split("|")]
        rows = {r.split("|")[1].strip(): dict(zip(headers, (c.strip() for c in r.strip().strip("|").split("|")))) for r in lines[1:]}
        assert {name.split(" (")[0].split(" mod_wsgi")[0] for name in rows} == {*servers, "upstream lookup"}, t
        floor = float(rows.pop("upstream lookup (all servers)")["p50 ms"])
        assert 0 < floor < 100, t  # the lookups' own percentiles
        for cells in rows.values():
            assert float(cells["CPU us/req"]) > 0, cells  # CPU per request was measured
            assert float(cells["req/s"]) > 0 and cells["failed"] == "0", cells  # everything offered was answered
            assert float(cells["p99 ms"]) >= floor, cells  # nobody beats the lookup
    if "Apache" in servers:
        assert out.stdout.count(" req/s: TAFE p99 ") == 2  # one goal line per rate


def test_throughput_runs_wrk_against_tafe_and_gunicorn_side_by_side(tmp_path):
    """wrk (installed by .ci/run) drives TAFE and gunicorn -k gevent; the ratio row is printed."""
    cmd = [sys.executable, str(BENCH / "throughput" / "run.py"), "--duration", "1", "--warmup", "1", "--rounds", "1"]
    cmd += ["--connections", "8", "--only", "TAFE, 1 worker direct", "--only", "gunicorn"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| server")}
    assert set(rows) == {"TAFE, 1 worker direct", "gunicorn -k gevent, 1 worker"}, out.stdout
    for cells in rows.values():
        assert int(cells[1].replace(",", "")) > 0  # some requests per second
        assert cells[6].startswith("200 ")  # the ~1.5 KB request gets a bid
        assert cells[7] == "0"  # no wrk errors (connect, read, write, non-2xx, timeout)
    assert rows["gunicorn -k gevent, 1 worker"][2] == "1.00x"
    assert "Goals, one worker direct vs `gunicorn -k gevent`" in out.stdout


def test_shading_benchmark_runs_both_kinds_of_notices_and_three_rounds():
    out = subprocess.run([sys.executable, str(BENCH / "shading.py"), "--views", "1500", "--seeds", "1"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 1 ")]
    assert len(rows) == 6 and all(" fixed 0.85 " in r or " learned, " in r for r in rows), out.stdout
    assert "seed 1, min-to-win filled in: **" in out.stdout and "seed 1, win/loss only: **" in out.stdout
