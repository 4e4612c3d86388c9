"""``tafe up`` against real processes: a real Nginx in front of real workers, real HTTP.

Needs the nginx binary (``.ci/run`` installs Debian's package). The rolling restart
runs a bounded load of several hundred requests/s for at least 20 s.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import stop_process
from test_master import BID, ROOT, UNIX_HOST, Load, Proc, alive, bid, children, request, scrape, scrape_until

from tafe import nginx as nginx_mod
from tafe.settings import Settings

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(nginx_mod.find_binary(Settings()) is None, reason="nginx not installed (.ci/run installs it)"),
]

UP_RE = (
    r"up: public (http://[\d.]+:\d+) via nginx \(pid (\d+)\); workers on (unix:/\S+|http://[\d.]+:\d+) \(pids ([\d ]+)\)"
    r"; admin (http://[\d.]+:\d+)"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, *args: str) -> None:
        self.proc = Proc(
            "up", "--workers", "2", "--port", str(free_port()), "--admin-port", "0", "--drain-grace-s", "1", *args
        )
        m = self.proc.wait_for(UP_RE, timeout=60)
        self.url, self.worker_url, self.admin_url = m.group(1), m.group(3), m.group(5)
        self.nginx_pid = int(m.group(2))

    def workers(self) -> set[int]:
        return {p for p in children(self.proc.pid) if alive(p) and p != self.nginx_pid}

    def everything(self) -> set[int]:
        """The node's whole process tree: master, Nginx master and workers, TAFE workers."""
        pids = {self.proc.pid} | children(self.proc.pid)
        return pids | children(self.nginx_pid)


@pytest.fixture
def node():
    n = Node("--access-log")
    yield n
    n.proc.stop()


def _answer(status: int, body: bytes) -> tuple[int, dict]:
    """Status and BidResponse, with the per-bid random ids and notice tokens masked."""
    text = body.decode()
    if text:
        resp = json.loads(text)
        ids = {resp.get("bidid")} | {b["id"] for sb in resp.get("seatbid", []) for b in sb["bid"]}
        for bid_id in filter(None, ids):
            text = text.replace(bid_id, "BIDID")
        text = re.sub(r"t=[A-Za-z0-9._-]+", "t=TOKEN", text)  # each token signs its bid id and time
    return status, (json.loads(text) if text else {})


def test_bid_through_nginx_is_the_workers_answer_and_admin_is_not_public(node):
    direct = _answer(*bid(node.worker_url)[::2])
    proxied = _answer(*bid(node.url)[::2])
    # The notice URLs point at the address each was asked on: the public one through Nginx.
    assert node.worker_url.startswith("unix:")  # a temporary run directory: Nginx reaches the workers' socket
    public, internal = node.url.removeprefix("http://"), UNIX_HOST
    assert public in json.dumps(proxied) and internal not in json.dumps(proxied)
    proxied = tuple(json.loads(json.dumps(proxied).replace(public, internal)))
    assert proxied == direct and direct[0] == 200 and direct[1]["seatbid"]
    assert request(node.url)[0] == 200  # /ping passes through
    for path in ("/metrics", "/debug/blocking", "/debug/"):
        assert request(node.url, path=path)[0] == 404
    assert request(node.admin_url, path="/metrics")[0] == 200


def test_a_host_tafe_cannot_use_gets_notice_urls_on_this_machine_not_the_workers_socket(node):
    # Nginx passes "bad_host" on; TAFE's notice URLs fall back to SERVER_NAME and SERVER_PORT,
    # which on the workers' unix socket name this machine, never the socket's path.
    status, _, body = bid(node.url, Host="bad_host")
    nurl = json.loads(body)["seatbid"][0]["bid"][0]["nurl"]
    assert status == 200 and nurl.startswith("http://localhost:80/"), nurl


def test_nginx_runs_as_a_batch_task_and_the_workers_do_not(node):
    """A woken Nginx worker must not preempt a TAFE worker mid-bid (tafe.nginx.Nginx.start)."""
    nginx = {node.nginx_pid} | children(node.nginx_pid)
    assert len(nginx) >= 2  # the master and at least one worker
    assert {os.sched_getscheduler(p) for p in nginx} == {os.SCHED_BATCH}
    assert len(node.workers()) == 2
    assert {os.sched_getscheduler(p) for p in node.workers() | {node.proc.pid}} == {os.SCHED_OTHER}


def test_request_id_reaches_tafe_and_both_logs(node):
    mark = len(node.proc.lines)
    assert request(node.url, "POST", "/openrtb2/bid", BID, {"Content-Type": "application/json"})[0] == 200
    rid = node.proc.wait_for(r'"POST /openrtb2/bid HTTP/1.1" 200 .* rid=([0-9a-f]{32})', start=mark).group(1)
    node.proc.wait_for(rf'tafe.access.*"POST /openrtb2/bid" 200 .* {rid}$', start=mark)
    # An exchange's own id is kept.
    mark = len(node.proc.lines)
    request(node.url, "POST", "/openrtb2/bid", BID, {"Content-Type": "application/json", "X-Request-Id": "exch-42"})
    node.proc.wait_for(r"tafe.access.* exch-42$", start=mark)
    node.proc.wait_for(r"rid=exch-42", start=mark)


def test_metrics_move_with_the_traffic_sent_through_nginx(node):
    key = 'tafe_http_requests_total{route="bid",status="200"}'
    before = scrape(node.admin_url)
    sent = 50
    for _ in range(sent):
        assert bid(node.url)[0] == 200
    after = scrape_until(node.admin_url, key, before.get(key, 0.0) + sent)
    assert after[key] - before.get(key, 0.0) == sent
    assert after['tafe_http_request_duration_seconds_count{route="bid"}'] - before.get(
        'tafe_http_request_duration_seconds_count{route="bid"}', 0.0
    ) == sent
    assert after["tafe_bid_price_cpm_count"] > before.get("tafe_bid_price_cpm_count", 0.0)


def test_sighup_rolling_restart_under_load_drops_nothing():
    node = Node()
    try:
        old = node.workers()
        mark = len(node.proc.lines)
        pings: collections.Counter[int] = collections.Counter()
        with Load(node.url, concurrency=8) as load:
            time.sleep(3.0)
            os.kill(node.proc.pid, signal.SIGHUP)
            while "rolling restart done" not in "".join(node.proc.lines[mark:]):
                pings[request(node.url, path="/ping")[0]] += 1  # the balancer keeps the machine
                time.sleep(0.05)
            time.sleep(max(1.0, 20.0 - (time.monotonic() - load.started)))
        print(f"rolling restart: {load.total} requests in {load.stopped - load.started:.1f}s ({load.rate():.0f}/s)")
        assert not load.bad(), load.bad()
        assert set(pings) == {200}, pings
        assert load.stopped - load.started >= 20.0
        new = node.workers()
        assert len(new) == 2 and not (new & old), (old, new)
        assert node.proc.wait_for("nginx config unchanged: not reloaded", start=mark)
        assert bid(node.url)[0] == 200
    finally:
        node.proc.stop()


def test_port_0_and_a_new_run_dir(tmp_path):
    # Nginx cannot listen on port 0: TAFE picks the port, logs it, and keeps it on SIGHUP.
    run_dir = tmp_path / "not" / "yet"
    node = Node("--port", "0", "--run-dir", str(run_dir))
    try:
        assert not node.url.endswith(":0") and bid(node.url)[0] == 200
        assert (run_dir / "nginx").is_dir()
        # Under root Nginx's workers run as nobody, which pytest's private tmp_path keeps out:
        # the workers then listen on loopback TCP; otherwise on a socket in the run directory.
        if os.geteuid() == 0:
            assert node.worker_url.startswith("http://127.0.0.1:") and not (run_dir / "workers.sock").exists()
            assert node.proc.wait_for("is out of reach of nginx's workers \\(user nobody\\): the workers listen on loopback TCP")
        else:
            assert node.worker_url == f"unix:{run_dir / 'workers.sock'}"
        assert request(node.worker_url)[0] == 200
        mark = len(node.proc.lines)
        os.kill(node.proc.pid, signal.SIGHUP)
        node.proc.wait_for("rolling restart done", start=mark, timeout=60)
        assert node.proc.wait_for("nginx config unchanged: not reloaded", start=mark)
        assert bid(node.url)[0] == 200
    finally:
        node.proc.stop()
    assert run_dir.is_dir()  # the user's: left in place
    assert not (run_dir / "workers.sock").exists()


@pytest.mark.parametrize("command", [["up"], ["serve", "--workers", "2"]], ids=["up", "serve-prefork"])
def test_a_run_dir_that_cannot_be_made_is_a_clear_error(tmp_path, command):
    (tmp_path / "file").write_text("")
    proc = Proc(*command, "--port", "0", "--run-dir", str(tmp_path / "file" / "run"))
    try:
        assert proc.proc.wait(30) == 2
        assert proc.wait_for(r"tafe: run_dir '.*/file/run': Not a directory")
        assert "Traceback" not in "".join(proc.lines)
    finally:
        proc.stop()


def test_sigterm_under_load_answers_every_accepted_request_and_leaves_nothing():
    node = Node("--drain-grace-s", "6")
    tree = node.everything()
    assert len(tree) >= 5  # tafe up, 2 workers, nginx master + worker(s)
    try:
        with Load(node.url, concurrency=8) as load:
            time.sleep(2.0)
            node.proc.proc.send_signal(signal.SIGTERM)
            # the balancer sees /ping 503 during the grace and stops sending; the signal
            # reaches the workers through two processes, so allow a loaded machine time
            deadline = time.monotonic() + 5
            while request(node.url)[0] != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert request(node.url)[0] == 503
        assert node.proc.proc.wait(60) == 0, node.proc.output()[-3000:]
    finally:
        node.proc.stop(signal.SIGKILL)
    assert not load.bad(), load.bad()
    assert sum(load.statuses.values()) > 100
    deadline = time.monotonic() + 5
    while any(alive(p) for p in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in tree if alive(p)]


def test_kill_9_worker_behind_nginx(node):
    with Load(node.url, concurrency=8) as load:
        time.sleep(2.0)
        victim = min(node.workers())
        mark = len(node.proc.lines)
        os.kill(victim, signal.SIGKILL)
        m = node.proc.wait_for(r"worker (\d) started \(pid (\d+)\)", start=mark, timeout=5)
        node.proc.wait_for(rf"worker {m.group(1)} ready \(pid {m.group(2)}\)", start=mark)
        time.sleep(1.0)
    # Nginx answers 502 for requests that were in flight on the killed worker (a POST
    # that reached a worker is never retried): at most one per client connection.
    failed = load.statuses.get(502, 0) + len(load.errors)
    assert failed <= load.concurrency, load.bad()
    assert not {s for s in load.bad() if s not in (502, "errors", "first errors")}, load.bad()
    assert victim not in node.workers() and len(node.workers()) == 2
    assert re.search(rf"\(pid {victim}\) killed by signal 9", node.proc.output())


def test_json_logs_carry_the_same_request_id_from_nginx_and_tafe():
    node = Node("--access-log", "--log-json")
    try:
        mark = len(node.proc.lines)
        assert bid(node.url)[0] == 200
        line = node.proc.wait_for(r'^\{.*"uri":"/openrtb2/bid".*\}$', start=mark).group(0)
        from_nginx = json.loads(line)
        assert from_nginx["status"] == 200 and re.fullmatch(r"[0-9a-f]{32}", from_nginx["request_id"])
        rid = from_nginx["request_id"]
        line = node.proc.wait_for(rf'^\{{.*"logger": "tafe.access".*{rid}.*\}}$', start=mark).group(0)
        from_tafe = json.loads(line)
        assert from_tafe["request_id"] == rid and from_tafe["path"] == "/openrtb2/bid" and from_tafe["status"] == 200
    finally:
        node.proc.stop()


class KeepAliveClients:
    """Clients behind a load balancer, each on one persistent connection, back to back.

    A client honours "Connection: close" by reconnecting, as real clients do, but once
    the balancer has seen ``/ping`` 503 twice in a row new connections go to other
    machines: the client stops instead. A request that gets no answer (EOF, reset, refused) is a failure.
    """

    def __init__(self, url: str, clients: int = 6) -> None:
        self.parts = urlsplit(url)
        self.rotated_out_at = 0.0  # when the balancer saw /ping 503 the second time in a row
        self.answers: list[tuple[float, float, int, str]] = []  # (sent, answered, status, Connection)
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._balancer = threading.Thread(target=self._balance, daemon=True)
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> KeepAliveClients:
        for t in [self._balancer, *self._threads]:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Wait until the balancer has rotated the machine out and every client stopped."""
        for t in [self._balancer, *self._threads]:
            t.join(60)

    def _balance(self) -> None:
        # Two failed checks in a row, 0.1 s apart, as balancers count an unhealthy
        # threshold: the clients go on sending (and being told to close) meanwhile.
        deadline = time.monotonic() + 30
        failed = 0
        while not self.rotated_out_at:
            failed = failed + 1 if request(f"http://{self.parts.netloc}")[0] == 503 else 0
            if failed >= 2 or time.monotonic() > deadline:
                self.rotated_out_at = time.monotonic()
            time.sleep(0.1)

    def _client(self) -> None:
        conn = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if conn is None:
                if self.rotated_out_at:
                    return
                conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=10)
            sent = time.monotonic()
            try:
                conn.request("POST", "/openrtb2/bid", body=BID, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = None
                continue
            with self._lock:
                self.answers.append((sent, time.monotonic(), resp.status, resp.getheader("Connection", "")))
            if resp.will_close:
                conn.close()
                conn = None


def test_sigterm_tells_keep_alive_clients_to_close_and_loses_no_request():
    node = Node("--drain-grace-s", "2")
    try:
        with KeepAliveClients(node.url) as clients:
            time.sleep(2.0)
            signalled = time.monotonic()
            node.proc.proc.send_signal(signal.SIGTERM)
        assert node.proc.proc.wait(60) == 0, node.proc.output()[-3000:]
    finally:
        node.proc.stop(signal.SIGKILL)
    assert not clients.failures, clients.failures[:5]
    assert len(clients.answers) > 200 and {s for _, _, s, _ in clients.answers} <= {200, 204}
    assert clients.rotated_out_at > signalled
    # Once one answer has said "close" (the drain began), every request sent after it
    # is answered "Connection: close" too, up to the balancer's rotation and beyond.
    drained_at = min(got for sent, got, _, conn in clients.answers if sent > signalled and conn == "close")
    late = collections.Counter(conn for sent, _, _, conn in clients.answers if sent > drained_at)
    assert late["close"] > 6 and set(late) == {"close"}, late
    # Before the signal, connections were kept (but for requests in flight at it).
    before = collections.Counter(conn for sent, _, _, conn in clients.answers if sent < signalled)
    assert before["close"] <= 6 < before["keep-alive"] and set(before) <= {"close", "keep-alive"}, before


def test_a_port_another_process_holds_is_one_line_at_once():
    with socket.socket() as other:  # a plain server that accepts (into its backlog) and never answers
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        started = time.monotonic()
        proc = Proc("up", "--workers", "2", "--port", str(port), "--admin-port", "0")
        try:
            code = proc.proc.wait(30)
        finally:
            proc.stop(signal.SIGKILL)
        took = time.monotonic() - started
    proc.wait_for(r"\Z", timeout=5)  # the pump has read everything
    lines = [line for line in proc.lines if line.strip()]
    assert code == 2 and took < 10, (code, took)
    assert len(lines) == 1, lines
    assert re.search(rf"^tafe: cannot listen on 127\.0\.0\.1:{port}: Address already in use$", lines[0]), lines


def test_access_logs_to_a_file_opened_without_append_keep_every_line(tmp_path):
    # `tafe up --access-log > log 2>&1`: the shell opens the file without O_APPEND.
    log_path = tmp_path / "log"
    port = free_port()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tafe", "up", "--workers", "2", "--port", str(port), "--admin-port", "-1",
             "--drain-grace-s", "0.5", "--access-log"],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "up: public" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        sent = 300
        for _ in range(sent):
            assert bid(f"http://127.0.0.1:{port}")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        stop_process(proc, signal.SIGKILL)
    text = log_path.read_text()
    from_nginx = re.findall(r'"POST /openrtb2/bid HTTP/1\.1" 200 .* rid=', text)
    from_tafe = re.findall(r'tafe\.access.*"POST /openrtb2/bid" 200', text)
    assert (len(from_nginx), len(from_tafe)) == (sent, sent)
    assert "\x00" not in text and re.search(r"worker \d \(pid \d+\) exited with code 0 after draining", text)


def test_a_run_dir_nginx_can_reach_gets_the_workers_socket_and_a_stale_one_is_replaced():
    run_dir = Path(tempfile.mkdtemp(prefix="tafe-up-test-"))  # /tmp and this: searchable by nobody too
    os.chmod(run_dir, 0o755)
    try:
        (run_dir / "workers.sock").write_text("left by a run that was killed")
        node = Node("--run-dir", str(run_dir))
        try:
            assert node.worker_url == f"unix:{run_dir / 'workers.sock'}"
            assert stat.S_ISSOCK((run_dir / "workers.sock").stat().st_mode)
            assert bid(node.url)[0] == 200 and request(node.worker_url)[0] == 200
        finally:
            node.proc.stop()
        assert not (run_dir / "workers.sock").exists()
    finally:
        shutil.rmtree(run_dir)


def test_a_run_dir_too_long_for_a_unix_socket_gets_the_workers_on_loopback_tcp():
    top = Path(tempfile.mkdtemp(prefix="tafe-up-test-"))
    os.chmod(top, 0o755)
    run_dir = top / ("d" * (110 - len(str(top))))  # reachable, but workers.sock would be too long
    try:
        node = Node("--run-dir", str(run_dir))
        try:
            assert node.worker_url.startswith("http://127.0.0.1:")
            assert node.proc.wait_for(r"workers\.sock is longer than a unix socket's path may be \(107 bytes\)")
            assert bid(node.url)[0] == 200 and request(node.worker_url)[0] == 200
        finally:
            node.proc.stop()
    finally:
        shutil.rmtree(top)
