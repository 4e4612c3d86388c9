"""One machine under ``tafe up``: rolling restart and kill -9 under wrk load, scrape cost.

In ONE run, against one ``tafe up --workers 2`` (real Nginx, real workers):

1. wrk (POST of the demo bid, keep-alive) through Nginx, steady: the baseline.
2. The same load while SIGHUP rolls both workers: requests, non-2xx, socket errors,
   and how long the roll took.
3. The same load while one worker is killed with SIGKILL: what fails (only what was
   in flight on it), and how soon the master started its replacement.
4. ``/metrics`` scrape cost on the admin port, and ``/ping`` latency on a worker
   with and without back-to-back scrapes (the merge of the workers' metric files runs
   off the event loop: see tafe.metrics.exposition).

    .venv/bin/python benchmarks/prefork.py [--duration 20] [--record]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BID = common.ROOT / "tafe" / "data" / "demo-request.json"
UP_RE = re.compile(r"up: public (http://[\d.]+:\d+) via nginx .*workers on unix:(\S+) .*admin http://([\d.]+):(\d+)")
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{path}", "rb"); wrk.body = f:read("*a"); f:close()
"""


def wrk(url: str, duration: float, script: Path, during=None) -> dict:
    cmd = ["wrk", "-t2", "-c32", f"-d{int(duration)}s", "--latency", "-s", str(script), url + "/openrtb2/bid"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    if during is not None:
        during()
    out = proc.communicate()[0]
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)
    return {
        "requests": requests,
        "rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, sock.groups())) if sock else 0,
        "p99": p99.group(1) if p99 else "?",
    }


def log_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines()


def wait_line(path: Path, pattern: str, start: int, timeout: float = 90.0) -> tuple[int, re.Match]:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = log_lines(path)
        for i in range(start, len(lines)):
            if m := regex.search(lines[i]):
                return i, m
        time.sleep(0.05)
    raise RuntimeError(f"no {pattern!r} in {path}")


def stamp(line: str) -> float:
    day, clock = line.split(" ")[:2]
    hms, millis = clock.split(",")
    return time.mktime(time.strptime(f"{day} {hms}", "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000.0


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the workers' unix socket (their listener behind Nginx)."""

    def __init__(self, path: str) -> None:
        super().__init__("tafe-workers", timeout=10)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def get_latencies(conn: http.client.HTTPConnection, path: str, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        conn.request("GET", path)
        conn.getresponse().read()
        out.append(time.perf_counter() - t)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of wrk load per phase")
    parser.add_argument("--record", action="store_true", help="write the results into benchmarks/RESULTS.md")
    args = parser.parse_args()
    missing = common.ensure_debian({"wrk": "wrk", "/usr/sbin/nginx": "nginx"})
    if missing:
        print(f"missing: {missing}")
        return 1
    info = common.machine_info(["nginx", "wrk"])
    print(common.format_machine(info), flush=True)
    scratch = tempfile.TemporaryDirectory(prefix="tafe-prefork-")  # removed at exit
    work = Path(scratch.name)
    script = work / "post.lua"
    script.write_text(WRK_LUA.format(path=BID))
    log = common.OUT_DIR / "prefork-up.log"  # kept after the run, for a failure to point at
    log.unlink(missing_ok=True)
    port, admin_port = common.free_port(), common.free_port()
    cmd = [sys.executable, "-m", "tafe", "up", "--workers", "2", "--port", str(port), "--admin-port", str(admin_port),
           "--drain-grace-s", "1"]  # fmt: skip
    proc = common.start(cmd, log)
    rows = []
    try:
        _, m = wait_line(log, UP_RE.pattern, 0, 60)
        url, workers, ahost, aport = m.group(1), m.group(2), m.group(3), int(m.group(4))
        base = wrk(url, args.duration, script)
        rows.append(["steady", base["requests"], f"{base['rate']:.0f}", base["p99"], base["non2xx"], base["socket_errors"], ""])

        def roll() -> None:
            time.sleep(2)
            mark = len(log_lines(log))
            os.kill(proc.pid, signal.SIGHUP)
            i, _ = wait_line(log, "rolling restart of", mark)
            j, _ = wait_line(log, "rolling restart done", mark)
            lines = log_lines(log)
            roll.took = stamp(lines[j]) - stamp(lines[i])

        r = wrk(url, args.duration, script, roll)
        rows.append(["SIGHUP roll (2 workers)", r["requests"], f"{r['rate']:.0f}", r["p99"], r["non2xx"], r["socket_errors"],
                     f"roll took {roll.took:.1f}s"])  # fmt: skip

        def kill() -> None:
            time.sleep(2)
            mark = len(log_lines(log))
            pids = [int(x) for x in re.findall(r"worker \d ready \(pid (\d+)\)", "\n".join(log_lines(log)))]
            victim = next(p for p in reversed(pids) if Path(f"/proc/{p}").exists())
            killed = time.time()
            os.kill(victim, signal.SIGKILL)
            i, _ = wait_line(log, r"worker \d started \(pid \d+\)", mark)
            kill.after = stamp(log_lines(log)[i]) - killed

        k = wrk(url, args.duration, script, kill)
        rows.append(["kill -9 one worker", k["requests"], f"{k['rate']:.0f}", k["p99"], k["non2xx"], k["socket_errors"],
                     f"replacement started {kill.after * 1000:.0f} ms after the kill"])  # fmt: skip

        scrape = get_latencies(http.client.HTTPConnection(ahost, aport, timeout=10), "/metrics", 5.0)
        quiet = get_latencies(UnixHTTPConnection(workers), "/ping", 5.0)
        stop = threading.Event()

        def scraper() -> None:
            while not stop.is_set():
                get_latencies(http.client.HTTPConnection(ahost, aport, timeout=10), "/metrics", 0.5)

        t = threading.Thread(target=scraper)
        t.start()
        busy = get_latencies(UnixHTTPConnection(workers), "/ping", 5.0)
        stop.set()
        t.join()
    finally:
        common.stop(proc)
    s, q, b = (common.summarize([x * 1000 for x in v]) for v in (scrape, quiet, busy))
    text = [
        "## Pre-forked node: rolling restart, kill -9, scrape cost (tafe up, real Nginx)",
        "",
        f"Command: `.venv/bin/python benchmarks/prefork.py --duration {args.duration:g} --record` "
        "(one `tafe up --workers 2 --drain-grace-s 1`; wrk -t2 -c32 POSTing the demo bid through Nginx, "
        f"{args.duration:g} s per row; server and wrk share the cores)",
        "",
        "```",
        common.format_machine(info),
        "```",
        "",
        common.table(["load phase", "requests", "req/s", "p99", "non-2xx", "socket errors", "note"], rows),
        "",
        common.table(
            ["probe", "n", "p50 ms", "p99 ms", "max ms"],
            [
                ["GET /metrics (admin, 2 workers merged)", int(s["n"]), f"{s['p50']:.2f}", f"{s['p99']:.2f}", f"{s['max']:.2f}"],
                ["GET /ping on a worker, no scrapes", int(q["n"]), f"{q['p50']:.2f}", f"{q['p99']:.2f}", f"{q['max']:.2f}"],
                ["GET /ping on a worker, back-to-back scrapes", int(b["n"]), f"{b['p50']:.2f}", f"{b['p99']:.2f}", f"{b['max']:.2f}"],
            ],
        ),
        "",
        f"ping p99 with back-to-back scrapes / without: {common.ratio(b['p99'], q['p99'])}",
    ]
    print("\n".join(text))
    if args.record:
        common.record("prefork", "\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
