"""Smoke tests of the benchmark harness: it runs end to end and measures what it claims.

No speed is asserted: only that the harness works, and that the open-loop client counts
a server's stall in the latency of every request that was due during it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
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
        [sys.executable, str(BENCH / "threads_vs_greenlets" / "upstream.py"), "--port", str(port), "--delay-ms", "100"],
        tmp_path / "upstream.log",
    )
    try:
        common.wait_port(port, proc=upstream)
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import openloop\n"
            "r = openloop.run(int(sys.argv[2]), b'GET /user/1 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n', rate=50, duration_s=1.0,"
            " warmup_s=0.0, connections=1)\n"
            "print(json.dumps({'lat': r.latencies_ms, 'statuses': r.statuses, 'errors': r.errors}))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(BENCH / "threads_vs_greenlets"), str(port)], capture_output=True, text=True, timeout=60
        )
    finally:
        common.stop(upstream)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    lat = sorted(result["lat"])
    assert result["statuses"] == {"200": 50} and not result["errors"]
    assert lat[0] >= 95  # the server's own 100 ms
    assert lat[-1] > 2000  # the 50th request was due at 1 s and answered at ~5 s


def test_threads_vs_greenlets_runs_end_to_end_on_the_gevent_servers(tmp_path):
    chart = tmp_path / "latency.png"
    cmd = [sys.executable, str(BENCH / "threads_vs_greenlets" / "run.py"), "--rate", "40", "--duration", "1", "--warmup", "0.5", "--rounds", "1"]
    cmd += ["--connections", "8", "--only", "TAFE", "--only", "gunicorn gevent", "--chart", str(chart)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| TAFE (gevent)") for r in rows), out.stdout
    assert any(r.startswith("| gunicorn gevent") for r in rows), out.stdout
    assert "FAILED" not in out.stdout
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[0].startswith(("TAFE", "gunicorn")):
            assert float(cells[7]) > 0, row  # CPU per request was measured
            assert cells[9] == "0", row  # no failed requests


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
