"""What the Redis money state costs the bid path, against the embedded (LMDB) default, one run.

Two copies of the public WSGI app over the same budgeted, paced and frequency-capped
campaigns (``money_path.py``'s), one on the embedded state, one on a real redis-server
started here on a free 127.0.0.1 port (stopped by pid at the end): the same bid requests
(known users, so each makes its one frequency read), in interleaved rounds in this one
process, each app syncing its floats every 1,000 requests as a worker does about once a
second. Both CPU time and wall time: a Redis round trip is mostly waiting, not CPU. Then
the cost of one call of each kind on each state, wall time, median of many.

    .venv/bin/python benchmarks/money_state.py [--rounds 5] [--record]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_machine, machine_info, record, table  # noqa: E402
from money_path import _app as money_app  # noqa: E402
from money_path import _requests, _run  # noqa: E402

from tafe.money.redis_state import FAST_TIMEOUT_S  # noqa: E402
from tafe.money.state import BidRef, Want  # noqa: E402


def _redis(tmp: Path) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(tmp), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def _app(state: str, tmp: Path):
    return money_app(True, tmp, state)


def _call_costs(state, n: int = 2000) -> dict[str, float]:
    """Median wall us of one call of each kind."""
    now = time.time()
    want = [Want("bench", 0, int(now) + 3600, 10**15, "even", 10**9)]
    calls = {
        "frequency (bid path)": lambda i: state.frequency(f"user-{i % 50}"),
        "reserve (1 campaign)": lambda i: state.reserve("bench-worker", [], want, now),
        "commit (bill)": lambda i: state.commit(BidRef(f"bench-{i}", "bench", 0, 1000, "", int(now) + 3600), 500, now),
    }
    out = {}
    for name, call in calls.items():
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000, help="bid requests per app per round")
    parser.add_argument("--record", action="store_true", help="rewrite the section in benchmarks/RESULTS.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tafe-money-state-bench-"))
    redis, url = _redis(tmp)
    try:
        bodies = _requests()
        apps = {"embedded (LMDB)": _app(str(tmp / "state"), tmp), "redis": _app(url, tmp)}
        for app, money, metrics in apps.values():  # warm up: caches, first sync, connections
            _run(app, money, metrics, bodies, 500)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in apps}
        for _ in range(args.rounds):
            for name, (app, money, metrics) in apps.items():
                results[name].append(_run(app, money, metrics, bodies, args.requests))
        timeouts = apps["redis"][2].registry.get_sample_value("tafe_money_state_errors_total", {"call": "frequency"}) or 0
        costs = {name: _call_costs(money.state) for name, (_, money, _) in apps.items()}
        rtt = costs["redis"]["frequency (bid path)"]
        redis_client = apps["redis"][1].state._r  # a bare PING: the floor of any call
        pings = []
        for _ in range(2000):
            t0 = time.perf_counter()
            redis_client.ping()
            pings.append(time.perf_counter() - t0)
    finally:
        redis.kill()
        redis.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    base_cpu, base_wall = (min(v[i] for v in results["embedded (LMDB)"]) for i in (0, 1))
    rows = []
    for name, runs in results.items():
        cpu, wall = min(r[0] for r in runs), min(r[1] for r in runs)
        rows.append((name, f"{cpu:.1f}", f"{wall:.1f}", f"{cpu / base_cpu:.2f}x", f"{wall / base_wall:.2f}x"))
    call_rows = [(call, f"{costs['embedded (LMDB)'][call]:.1f}", f"{costs['redis'][call]:.1f}") for call in costs["redis"]]
    call_rows.append(("PING (a bare round trip)", "", f"{statistics.median(pings) * 1e6:.1f}"))
    text = "\n".join([
        "## Money state: Redis against the embedded default on the bid path",
        "",
        "    .venv/bin/python benchmarks/money_state.py --rounds %d --record" % args.rounds,
        "",
        format_machine(machine_info()),
        "",
        table(["state", "CPU us per bid request (best)", "wall us (best)", "CPU vs embedded", "wall vs embedded"], rows),
        "",
        table(["call (median wall us)", "embedded", "redis"], call_rows),
        "",
        f"Every bid request here reads one user's frequency counts: one Redis round trip ({rtt:.0f} us on loopback,"
        " redis-py's pure-Python connection, no gevent in this process); most of its CPU is the send and receive system"
        " calls themselves (cProfile), which gevent does not make cheaper, only cooperative. Frequency reads past their"
        f" {FAST_TIMEOUT_S * 1000:.0f} ms timeout in this run (capped campaigns then skip that request):"
        f" {timeouts:.0f}. The reserve and commit scripts run off the bid path: about once a second per worker, and"
        " once per notice.",
    ])  # fmt: skip
    print(text)
    if args.record:
        record("money-state", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
