"""The pre-fork master against real processes: ``tafe serve --workers 2`` on 127.0.0.1.

Real workers, real sockets, a real load of bid requests from client threads. Also the
helpers the ``tafe up`` tests (tests/test_up.py) share: a process with its log lines,
a bounded closed-loop load, and metric scraping. Every process started here is stopped
by its PID (its workers die with it: they get SIGTERM when the master goes).
"""

from __future__ import annotations

import calendar
import collections
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import stop_process

ROOT = Path(__file__).resolve().parent.parent
# The demo request with the longest deadline TAFE allows, so a loaded test machine
# does not turn an expected bid into a deadline no-bid.
BID = json.dumps({**json.loads((ROOT / "tafe" / "data" / "demo-request.json").read_bytes()), "tmax": 1000}).encode()
OK = {200, 204}


class Proc:
    """A TAFE command with its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "tafe", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """The first log line from index ``start`` matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if m := regex.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._changed.wait(0.2)):
                    raise AssertionError(f"no line matching {pattern!r}:\n{self.output()[-6000:]}")
                self._changed.wait(min(left, 0.2))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        return stop_process(self.proc, sig, timeout)


def children(pid: int) -> set[int]:
    """Direct children of ``pid`` (from /proc), to check nothing is left behind."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


UNIX_HOST = "tafe-workers"  # the Host sent over a unix socket, where there is no host:port


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket: the workers' listener behind Nginx in ``tafe up``."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(UNIX_HOST, timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def request(url: str, method: str = "GET", path: str = "/ping", body: bytes | None = None, headers: dict | None = None):
    """One request to ``url``: http://host:port, or unix:PATH."""
    if url.startswith("unix:"):
        conn: http.client.HTTPConnection = UnixHTTPConnection(url.removeprefix("unix:"), timeout=10)
    else:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def bid(url: str, **headers: str):
    return request(url, "POST", "/openrtb2/bid", BID, {"Content-Type": "application/json", **headers})


def scrape(admin_url: str) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}."""
    status, _, body = request(admin_url, path="/metrics")
    assert status == 200
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def scrape_until(admin_url: str, key: str, at_least: float, timeout: float = 10.0) -> dict[str, float]:
    """Scrape until ``key`` reaches ``at_least``: each worker folds its counts into the
    shared files within a second (tafe.metrics.Deferred), so a scrape may lag that much."""
    deadline = time.monotonic() + timeout
    while (samples := scrape(admin_url)).get(key, 0.0) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return samples


class Load:
    """A bounded closed loop of bid requests: ``concurrency`` keep-alive connections.

    Each answer's status is counted; a request that gets no answer (connection reset or
    closed, timeout) is counted as an error, with what happened. ``fresh`` opens a new
    connection per request instead (the connections a drain must not close unread).
    """

    def __init__(self, url: str, concurrency: int = 8, fresh: bool = False) -> None:
        self.url = url
        self.concurrency = concurrency
        self.fresh = fresh  # a new connection per request (Connection: close)
        self.statuses: collections.Counter[int] = collections.Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(concurrency)]
        self.started = self.stopped = 0.0

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        self.stopped = self.stopped or time.monotonic()

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)

    def rate(self) -> float:
        return self.total / max(1e-9, (self.stopped or time.monotonic()) - self.started)

    def bad(self) -> dict:
        """Everything that is not a 200 or 204."""
        out: dict = {s: n for s, n in self.statuses.items() if s not in OK}
        if self.errors:
            out["errors"] = len(self.errors)
            out["first errors"] = self.errors[:5]
        return out

    def _loop(self) -> None:
        parts = urlsplit(self.url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
        headers = {"Content-Type": "application/json", **({"Connection": "close"} if self.fresh else {})}
        statuses: collections.Counter[int] = collections.Counter()
        while not self._stop.is_set():
            try:
                conn.request("POST", "/openrtb2/bid", body=BID, headers=headers)
                resp = conn.getresponse()
                resp.read()
                statuses[resp.status] += 1
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                time.sleep(0.01)
        conn.close()
        with self._lock:
            self.statuses.update(statuses)


def start_master(*args: str) -> tuple[Proc, str, str]:
    proc = Proc("serve", "--workers", "2", "--port", "0", "--admin-port", "0", "--drain-grace-s", "1", *args)
    m = proc.wait_for(r"tafe.master.* listening on (http://[\d.]+:\d+) \(admin (http://[\d.]+:\d+)\) with 2 workers")
    return proc, m.group(1), m.group(2)


def worker_pids(proc: Proc) -> set[int]:
    return {pid for pid in children(proc.pid) if alive(pid)}


@pytest.fixture
def master():
    proc, url, admin = start_master()
    yield proc, url, admin
    proc.stop()


def test_workers_serve_and_metrics_add_up_across_workers(master):
    proc, url, admin = master
    assert len(worker_pids(proc)) == 2
    key = 'tafe_http_requests_total{route="bid",status="200"}'
    before = scrape(admin).get(key, 0.0)
    sent = 60
    for _ in range(sent):  # new connections: the kernel spreads them over both workers
        status, _, body = bid(url)
        assert status == 200, body
    after = scrape_until(admin, key, before + sent)
    assert after[key] - before == sent  # the sum over both workers, whichever one answers the scrape
    assert after.get("tafe_http_requests_in_flight", 0) >= 0
    assert any(k.startswith("tafe_cqs_active_info{") for k in after)


def test_kill_9_worker_is_restarted_and_only_its_requests_fail(master):
    proc, url, admin = master
    with Load(url, concurrency=8) as load:
        time.sleep(2.0)
        victim = min(worker_pids(proc))
        mark = len(proc.lines)
        killed_at = time.time()
        os.kill(victim, signal.SIGKILL)
        m = proc.wait_for(r"^(\S+ \S+) INFO tafe.master\[\d+\] worker (\d) started \(pid (\d+)\)", start=mark)
        proc.wait_for(rf"worker {m.group(2)} ready \(pid {m.group(3)}\)", start=mark)
        time.sleep(1.0)
    stamp, millis = m.group(1).split(",")
    started = calendar.timegm(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000.0  # log times are UTC
    assert started - killed_at < 1.0, proc.output()[-3000:]
    assert f"(pid {victim}) killed by signal 9 (SIGKILL); restarting it" in proc.output()
    assert not {s: n for s, n in load.statuses.items() if s not in OK}, load.bad()
    # Only requests in flight on the killed worker can fail: at most one per connection.
    assert len(load.errors) <= load.concurrency, load.bad()
    assert sum(load.statuses.values()) > 100
    assert victim not in worker_pids(proc) and len(worker_pids(proc)) == 2
    restarts = scrape(admin)
    assert restarts.get('tafe_worker_restarts_total{cause="SIGKILL"}') == 1.0


def test_sigterm_under_load_answers_every_request_and_exits_0():
    proc, url, admin = start_master("--drain-grace-s", "2")
    workers = worker_pids(proc)
    try:
        with Load(url, concurrency=8) as load:
            time.sleep(2.0)
            proc.proc.send_signal(signal.SIGTERM)
            # The balancer sees /ping 503 during the grace and stops sending before it ends.
            time.sleep(1.0)
            status, _, _ = request(url, path="/ping")
            assert status == 503
        assert proc.proc.wait(30) == 0
    finally:
        proc.stop(signal.SIGKILL)
    assert not load.bad(), load.bad()
    assert sum(load.statuses.values()) > 100
    assert not any(alive(pid) for pid in workers)


def test_sighup_rolls_workers_without_failing_a_request(master):
    proc, url, admin = master
    old = worker_pids(proc)
    mark = len(proc.lines)
    pings: collections.Counter[int] = collections.Counter()
    with Load(url, concurrency=6) as load, Load(url, concurrency=6, fresh=True) as fresh:
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGHUP)
        while not re.search("rolling restart done", "".join(proc.lines[mark:])):
            pings[request(url, path="/ping")[0]] += 1  # the machine stays in service
            assert proc.proc.poll() is None
        time.sleep(1.0)
    assert not load.bad(), load.bad()
    assert not fresh.bad(), fresh.bad()
    assert set(pings) == {200}, pings
    new = worker_pids(proc)
    assert len(new) == 2 and not (new & old)
    status, _, _ = bid(url)
    assert status == 200


def test_worker_that_cannot_start_stops_the_master_with_its_reason_once():
    proc = Proc("serve", "--workers", "2", "--port", "0", "--admin-port", "-1", "--model", "/nonexistent/model.cqsm")
    try:
        assert proc.proc.wait(60) == 2
    finally:
        proc.stop(signal.SIGKILL)
    assert proc.lines == ["tafe: CQS model /nonexistent/model.cqsm: cannot read (No such file or directory)\n"]
    assert not worker_pids(proc)


def test_worker_crashing_before_it_is_ready_is_not_said_to_have_drained(tmp_path: Path):
    """A worker that dies while starting (not a configuration mistake: a crash) stops the
    master; the other worker, stopped while still starting, is said to be just that."""
    hook = tmp_path / "sitecustomize.py"  # slot 0 crashes on import, slot 1 is slow to start
    hook.write_text(
        "import os, sys, time\n"
        "if 'worker' in sys.argv and '--slot' in sys.argv:\n"
        "    slot = sys.argv[sys.argv.index('--slot') + 1]\n"
        "    if slot == '0': os._exit(3)\n"
        "    time.sleep(1)\n"
    )
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = Proc("serve", "--workers", "2", "--port", "0", "--admin-port", "-1", env=env)
    try:
        assert proc.proc.wait(60) == 1
    finally:
        proc.stop(signal.SIGKILL)
    out = proc.output()
    assert "worker 0 (pid" in out and "exited with code 3 before it was ready" in out, out
    assert re.search(r"worker 1 \(pid \d+\) stopped before it was ready \(", out), out
    assert "after draining" not in out and "draining 1 worker\n" in out, out


def test_restarted_worker_meeting_a_broken_file_stops_the_master_instead_of_looping(tmp_path: Path):
    campaigns = tmp_path / "campaigns.json"
    campaigns.write_bytes((ROOT / "tafe" / "data" / "campaigns.json").read_bytes())
    proc, url, admin = start_master("--campaigns", str(campaigns))
    try:
        campaigns.write_text("{broken")
        mark = len(proc.lines)
        os.kill(min(worker_pids(proc)), signal.SIGKILL)
        assert proc.proc.wait(60) == 1
    finally:
        proc.stop(signal.SIGKILL)
    out = "".join(proc.lines[mark:])
    assert out.count(f"campaigns file {campaigns}: ") == 1, out
    assert "a worker cannot start with the current configuration" in out, out
    assert out.count("worker 0 started") + out.count("worker 1 started") == 1, out  # one restart, no loop


def test_sighup_rereads_the_config_file(tmp_path: Path):
    config = tmp_path / "tafe.toml"
    config.write_text('seat = "before"\n')
    proc, url, admin = start_master("--config", str(config))
    try:
        assert json.loads(bid(url)[2])["seatbid"][0]["seat"] == "before"
        config.write_text('seat = "after"\n')
        mark = len(proc.lines)
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait_for("rolling restart done", timeout=60, start=mark)
        seats = {json.loads(bid(url)[2])["seatbid"][0]["seat"] for _ in range(20)}
        assert seats == {"after"}
        # A broken file keeps the running workers and says why.
        config.write_text("seat = \n")
        mark = len(proc.lines)
        os.kill(proc.pid, signal.SIGHUP)
        proc.wait_for("settings not reloaded, workers not restarted", start=mark)
        assert bid(url)[0] == 200
    finally:
        proc.stop()


def test_cpu_affinity_pins_each_worker_to_its_own_cpu():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    proc, url, admin = start_master("--cpu-affinity")
    try:
        pinned = [os.sched_getaffinity(pid) for pid in worker_pids(proc)]
        assert all(len(cpus) == 1 for cpus in pinned) and pinned[0] != pinned[1]
    finally:
        proc.stop()


def test_up_without_nginx_serves_on_the_public_port():
    proc = Proc("up", "--workers", "1", "--port", "0", "--admin-port", "-1", "--nginx", "no-such-nginx-binary")
    try:
        m = proc.wait_for(r"tafe.master.* listening on (http://[\d.]+:\d+)")
        assert "serving without Nginx" in proc.output()
        assert bid(m.group(1))[0] == 200
        assert proc.stop() == 0
    finally:
        proc.stop(signal.SIGKILL)
