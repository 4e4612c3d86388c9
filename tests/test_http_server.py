"""TAFE's HTTP/1.1 server over real sockets, against a real server process.

``tests/http/serve_app.py`` runs ``tafe.server`` with a small WSGI app; the tests speak
raw HTTP to it. ``tests/http/requests/*.http`` is a corpus of raw requests, each
headed by ``# key: value`` lines saying what must come back (LF is sent as CRLF).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tafe import http

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "http"
CORPUS = sorted((HERE / "requests").glob("*.http"))
LIMITS = {
    "TAFE_MAX_BODY_BYTES": "4096",
    "TAFE_MAX_HEADER_BYTES": "2048",
    "TAFE_READ_TIMEOUT_S": "1.0",
    "TAFE_KEEPALIVE_TIMEOUT_S": "5",
    "TAFE_DRAIN_GRACE_S": "0.5",
    "TAFE_DRAIN_TIMEOUT_S": "10",
}


class ServerProcess:
    def __init__(self, listener: socket.socket | None = None, **env: str) -> None:
        environ = dict(os.environ, TAFE_HOST="127.0.0.1", TAFE_PORT="0", PYTHONPATH=str(ROOT), **LIMITS)
        environ.update(env)
        fds = ()
        if listener is not None:
            environ["TEST_LISTEN_FD"] = str(listener.fileno())
            fds = (listener.fileno(),)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "serve_app.py")],
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=fds,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(line.split()[1])

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read()


@pytest.fixture(scope="module")
def server():
    proc = ServerProcess()
    yield proc
    proc.stop()


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)


class Reader:
    """Reads responses off a socket, one at a time (framing per RFC 9112)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed mid-head")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def closed(self) -> bool:
        """True if the server closed the connection with nothing more to read."""
        return not self.buf and not self._fill()

    def response(self, head: bool = False) -> Response:
        status_line = self._line()
        version, code = status_line.split(b" ", 2)[:2]
        assert version == b"HTTP/1.1", status_line
        headers: dict[str, str] = {}
        while line := self._line():
            name, value = line.decode("latin-1").split(":", 1)
            headers[name.lower()] = value.strip()
        status = int(code)
        if head or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b"")
        if "content-length" in headers:
            return Response(status, headers, self._take(int(headers["content-length"])))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._take(size)
                assert self._take(2) == b"\r\n"
            assert self._line() == b""
            return Response(status, headers, body)
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return Response(status, headers, body)


def exchange(server: ServerProcess, raw: bytes, count: int = 1, head: bool = False) -> tuple[list[Response], bool]:
    """Send raw bytes; read ``count`` responses; report whether the server then closed."""
    with server.connect() as sock:
        sock.sendall(raw)
        reader = Reader(sock)
        responses = [reader.response(head=head) for _ in range(count)]
        sock.settimeout(0.2)
        try:
            closed = reader.closed()
        except TimeoutError:
            closed = False
        return responses, closed


def load_case(path: Path) -> tuple[dict[str, list[str]], bytes]:
    text = path.read_text()
    meta: dict[str, list[str]] = {}
    lines = text.split("\n")
    while lines and lines[0].startswith("# "):
        key, _, value = lines.pop(0)[2:].partition(": ")
        meta.setdefault(key, []).append(value)
    return meta, "\n".join(lines).replace("\n", "\r\n").encode("latin-1")


# --- the corpus, over the wire and through the pure reader ---------------------------


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_over_the_wire(server, path):
    meta, raw = load_case(path)
    statuses = [int(s) for s in meta["expect"][0].split()]
    head = raw.startswith(b"HEAD ")
    responses, closed = exchange(server, raw, count=len(statuses), head=head)
    assert [r.status for r in responses] == statuses
    if statuses[-1] >= 400:
        assert closed, "a refused request must close the connection"
        return
    last = responses[-1]
    if "nobody" in meta:
        assert int(last.headers["content-length"]) > 0 and last.body == b""
        return
    doc = last.json()
    if "path" in meta:
        assert doc["path"] == meta["path"][0]
    if "body" in meta:
        assert doc["body"] == meta["body"][0]
        assert doc["content_length"] == str(len(meta["body"][0]))
    for item in meta.get("header", []):
        key, value = item.split("=", 1)
        assert doc["headers"].get(key) == value
    for key in meta.get("noheader", []):
        assert key not in doc["headers"]
    if "request_id" in meta:
        assert doc["request_id"] == meta["request_id"][0]


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_corpus_any_split_gives_the_same_requests(path):
    """Feeding byte by byte yields what feeding all at once does (reads split anywhere)."""
    _, raw = load_case(path)

    def run(pieces):
        reader = http.RequestReader(2048, 4096)
        got = []
        for piece in pieces:
            got += [(r.method, r.target, r.headers, r.body, r.keep_alive) for r in reader.feed(piece, 0.0)]
        return got, reader.error and reader.error.status

    assert run([raw]) == run([raw[i:i + 1] for i in range(len(raw))])


# --- behaviour that needs a conversation -----------------------------------------------


def test_keep_alive_reuses_one_connection(server):
    with server.connect() as sock:
        reader = Reader(sock)
        ids = set()
        for i in range(5):
            sock.sendall(b"GET /n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            resp = reader.response()
            assert resp.status == 200 and resp.json()["path"] == f"/n{i}"
            assert "connection" not in resp.headers
            ids.add(resp.json()["request_id"])
        assert len(ids) == 5


def test_wsgi_environ_has_the_standard_keys(server):
    with server.connect() as sock:
        sock.sendall(
            b"POST /a%2Fb/c?x=%20y HTTP/1.1\r\nHost: h.example\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 2\r\n\r\nhi"
        )
        env = Reader(sock).response().json()["environ"]
        assert env["REQUEST_METHOD"] == "POST"
        assert env["PATH_INFO"] == "/a/b/c" and env["RAW_URI"] == "/a%2Fb/c?x=%20y"
        assert env["QUERY_STRING"] == "x=%20y" and env["SCRIPT_NAME"] == ""
        assert env["CONTENT_TYPE"] == "text/plain" and env["CONTENT_LENGTH"] == "2"
        assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(server.port)
        assert env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["HTTP_HOST"] == "h.example"
        assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"] == str(sock.getsockname()[1])
        assert env["wsgi.url_scheme"] == "http" and env["wsgi.version"] == [1, 0]
        assert env["wsgi.multithread"] is False and env["wsgi.multiprocess"] is True
        assert env["wsgi.run_once"] is False
        assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env


def test_pipelining_many_requests_in_one_write_in_order(server):
    raw = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(20))
    responses, closed = exchange(server, raw, count=20)
    assert [r.json()["path"] for r in responses] == [f"/p{i}" for i in range(20)]
    assert not closed


def test_pipelined_connections_take_turns():
    """Four connections each queue ten requests behind a gate they all pass at once:
    the server must interleave them, not serve one connection's queue to the end."""
    proc = ServerProcess()
    try:
        socks = [proc.connect() for _ in range(4)]
        batch = b"GET /gate?4 HTTP/1.1\r\nHost: x\r\n\r\n" + b"GET /seq HTTP/1.1\r\nHost: x\r\n\r\n" * 10
        for sock in socks:
            sock.sendall(batch)
        orders = []
        for sock in socks:
            reader = Reader(sock)
            assert reader.response().body == b"open"
            orders.append([int(reader.response().body) for _ in range(10)])
            sock.close()
        assert sorted(n for order in orders for n in order) == list(range(40))
        for order in orders:
            assert max(order) - min(order) > 20, orders  # served one after another: 9
    finally:
        proc.stop()


def test_expect_100_continue(server):
    with server.connect() as sock:
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        reader = Reader(sock)
        interim = reader._line()
        assert interim == b"HTTP/1.1 100 Continue"
        assert reader._line() == b""
        sock.sendall(b"hello")
        resp = reader.response()
        assert resp.status == 200 and resp.json()["body"] == "hello"


def test_expect_100_continue_not_sent_when_body_too_large(server):
    raw = b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
    responses, closed = exchange(server, raw)
    assert responses[0].status == 413 and closed


def test_head_has_headers_but_no_body_and_keeps_alive(server):
    with server.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"HEAD /stream HTTP/1.1\r\nHost: x\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        head = reader.response(head=True)
        assert head.status == 200 and head.body == b""
        assert reader.response().body == b"pong"


def test_connection_close_is_honoured(server):
    responses, closed = exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert responses[0].body == b"pong"
    assert responses[0].headers["connection"] == "close"
    assert closed


def test_answer_survives_requests_pipelined_after_connection_close(server):
    more = b"GET /ignored HTTP/1.1\r\nHost: x\r\n\r\n" * 20000
    responses, closed = exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + more)
    assert responses[0].body == b"pong" and closed


def test_http10_keep_alive_only_when_asked(server):
    responses, closed = exchange(server, b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert responses[0].headers["connection"] == "keep-alive" and not closed
    responses, closed = exchange(server, b"GET /ping HTTP/1.0\r\n\r\n")
    assert responses[0].body == b"pong" and closed


def test_streamed_body_is_chunked_on_http11_and_delimited_by_close_on_http10(server):
    responses, _ = exchange(server, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert responses[0].headers["transfer-encoding"] == "chunked"
    assert responses[0].body == b"part0;part1;part2;"
    responses, closed = exchange(server, b"GET /stream HTTP/1.0\r\n\r\n")
    assert "content-length" not in responses[0].headers
    assert responses[0].body == b"part0;part1;part2;" and closed


def test_write_callable_and_204(server):
    with server.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"GET /write HTTP/1.1\r\nHost: x\r\n\r\nGET /empty HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.response().body == b"written;returned"
        empty = reader.response()
        assert empty.status == 204 and "content-length" not in empty.headers


def test_header_too_large_is_431(server):
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
    responses, closed = exchange(server, raw)
    assert responses[0].status == 431 and closed


def test_head_flood_without_end_is_431(server):
    with server.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n")
        reader = Reader(sock)
        try:
            for _ in range(100):
                sock.sendall(b"X-A: b\r\n" * 64)
        except OSError:
            pass  # the server may close while we still write
        assert reader.response().status == 431


def test_body_too_large_while_the_client_still_sends_is_413_not_a_reset(server):
    body = b"a" * (2 * 1024 * 1024)
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    responses, closed = exchange(server, raw + body)
    assert responses[0].status == 413 and closed


def test_chunked_body_too_large_is_413(server):
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"a" * 1024 + b"\r\n"
    with server.connect() as sock:
        reader = Reader(sock)
        sock.sendall(raw)
        try:
            for _ in range(8):
                sock.sendall(b"400\r\n" + b"a" * 1024 + b"\r\n")
        except OSError:
            pass
        assert reader.response().status == 413


def test_chunk_announced_past_the_cap_is_413_at_once_not_408_at_the_read_timeout():
    slow = ServerProcess(TAFE_READ_TIMEOUT_S="30")
    try:
        with slow.connect(timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10000\r\nabc")
            reader = Reader(sock)
            assert reader.response().status == 413
            assert time.monotonic() - started < 5  # the read timeout is 30 s
            assert reader.closed()
        responses, _ = exchange(slow, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert responses[0].body == b"pong"
    finally:
        slow.stop()


def test_transfer_coding_other_than_chunked_is_501_and_chunked_still_works(server):
    body = b"3\r\nabc\r\n0\r\n\r\n"
    head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: %s\r\n\r\n"
    responses, closed = exchange(server, head % b"gzip, chunked" + body)
    assert responses[0].status == 501 and closed
    responses, closed = exchange(server, head % b"chunked" + body)
    assert responses[0].status == 200 and responses[0].json()["body"] == "abc" and not closed


def test_slow_client_gets_408_while_others_are_served(server):
    with server.connect() as slow:
        slow.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")
        started = time.monotonic()
        while time.monotonic() - started < 0.5:
            responses, _ = exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert responses[0].body == b"pong"
        reader = Reader(slow)
        assert reader.response().status == 408
        assert reader.closed()


def test_connection_left_silent_from_the_start_is_closed_after_the_read_timeout(server):
    with server.connect() as sock:
        started = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed, without an answer: no request had begun
        assert time.monotonic() - started < 4  # the read timeout (1 s), not keep-alive (5 s)


def test_idle_keep_alive_connection_is_not_a_slow_client(server):
    with server.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.response().status == 200
        time.sleep(1.5)  # longer than the read timeout, shorter than the keep-alive one
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.response().status == 200


def test_app_exception_is_500_and_the_server_keeps_serving(server):
    with server.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.response().status == 500
        assert reader.response().body == b"pong"
    responses, _ = exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert responses[0].body == b"pong"


def test_start_response_with_exc_info_replaces_an_unsent_answer(server):
    responses, closed = exchange(server, b"GET /excinfo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert responses[0].status == 503 and responses[0].body == b"replaced" and not closed


def test_stream_failing_midway_closes_the_connection_without_a_last_chunk(server):
    with server.connect() as sock:
        sock.sendall(b"GET /broken-stream HTTP/1.1\r\nHost: x\r\n\r\n")
        reader = Reader(sock)
        with pytest.raises(EOFError):
            reader.response()  # the client sees a truncated body, not a complete one
    responses, _ = exchange(server, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    assert responses[0].body == b"pong"


def test_arrival_is_when_the_first_byte_came(server):
    with server.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        time.sleep(0.3)
        sock.sendall(b"ok")
        doc = reader.response().json()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        later = reader.response().json()
        assert later["arrival"] - doc["arrival"] >= 0.25


def test_processes_sharing_an_inherited_listener_all_keep_serving():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    workers = [ServerProcess(listener), ServerProcess(listener)]
    try:
        kept = []
        for i in range(12):
            sock = workers[0].connect()
            kept.append((sock, Reader(sock)))
            sock.sendall(b"GET /w%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            assert kept[-1][1].response().json()["path"] == f"/w{i}"
            for old, reader in kept:  # no process is stuck in accept()
                old.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                assert reader.response().body == b"pong"
        for sock, _ in kept:
            sock.close()
    finally:
        listener.close()
        for worker in workers:
            worker.stop()


def test_full_pool_holds_new_connections_until_idle_ones_time_out():
    proc = ServerProcess(TAFE_MAX_CONNECTIONS="2", TAFE_KEEPALIVE_TIMEOUT_S="2")
    try:
        held = []
        for _ in range(2):
            sock = proc.connect()
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(sock).response().body == b"pong"
            held.append(sock)
        with proc.connect() as third:
            third.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            third.settimeout(0.3)
            with pytest.raises(TimeoutError):
                third.recv(1)  # queued in the backlog: the pool is full
            third.settimeout(10)
            assert Reader(third).response().body == b"pong"  # once the idle ones are closed
        for sock in held:
            sock.settimeout(5)
            assert Reader(sock).closed()
            sock.close()
    finally:
        proc.stop()


def test_port_0_binds_a_real_port_and_the_server_reports_it():
    from tafe import server, settings
    from tafe.lifecycle import Lifecycle

    listener = server.bind("127.0.0.1", 0)
    try:
        srv = server.Server(listener, lambda env, start: [], settings.Settings(), Lifecycle())
        assert srv.address == listener.getsockname() and srv.address[1] > 0
    finally:
        listener.close()


def test_sigterm_drains_in_flight_then_refuses_and_exits_0():
    proc = ServerProcess(TAFE_DRAIN_GRACE_S="2.0", TAFE_ACCESS_LOG="1", TAFE_LOG_JSON="1")
    try:
        with proc.connect() as busy, proc.connect() as idle:
            busy.sendall(b"GET /slow?3 HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(idle).response().body == b"pong"
            time.sleep(0.2)  # the slow request is in the app now
            proc.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # During the grace new connections are still accepted, /ping says 503
            # (as soon as the signal has been handled).
            while True:
                responses, closed = exchange(proc, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                if responses[0].status == 503 or time.monotonic() - signalled > 1.8:
                    break
                time.sleep(0.02)
            assert responses[0].status == 503 and closed
            # Past the grace new connections are refused (polled: a loaded machine may
            # handle the signal late, and the grace counts from then).
            refused_by = time.monotonic() + 10
            while time.monotonic() < refused_by:
                try:
                    proc.connect(timeout=1).close()
                except OSError:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("new connections still accepted long after the grace")
            resp = Reader(busy).response()
            assert resp.status == 200 and resp.body == b"slow done"
            assert resp.headers["connection"] == "close"
            idle.settimeout(5)
            assert Reader(idle).closed()
        assert proc.proc.wait(10) == 0
    finally:
        err = proc.stop()
    assert "drained" in err
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [entry for entry in entries if entry["logger"] == "tafe.access"]
    slow = [entry for entry in access if entry["path"] == "/slow"]
    assert len(slow) == 1 and slow[0]["status"] == 200 and slow[0]["bytes"] == len(b"slow done")
    assert slow[0]["method"] == "GET" and slow[0]["request_id"] and slow[0]["duration_ms"] >= 2500



# --- the fast path: an app with ``handle`` (as TAFE's public app) ---------------------


@pytest.fixture(scope="module")
def direct():
    proc = ServerProcess(TEST_DIRECT="1")
    yield proc
    proc.stop()


def test_direct_handle_gets_the_request_and_its_answer_is_framed_by_the_server(direct):
    body = b'{"id": "1"}'
    raw = b"POST /direct/echo%21?q=1 HTTP/1.1\r\nHost: x\r\nX-Openrtb-Version: 2.5\r\nContent-Length: 11\r\n\r\n" + body
    responses, closed = exchange(direct, raw)
    resp = responses[0]
    assert resp.status == 200 and not closed
    assert resp.headers["content-length"] == str(len(resp.body)) and resp.headers["content-type"] == "application/json"
    assert "date" in resp.headers and "connection" not in resp.headers
    doc = resp.json()
    assert doc["by"] == "handle" and doc["method"] == "POST" and doc["path"] == "/direct/echo!" and doc["body"] == body.decode()
    assert doc["headers"]["HTTP_X_OPENRTB_VERSION"] == "2.5" and doc["arrival"] > 0


def test_direct_chunked_body_arrives_whole_and_other_paths_stay_wsgi(direct):
    raw = b"POST /direct/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    raw += b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
    responses, closed = exchange(direct, raw, count=2)
    assert responses[0].json()["body"] == "abcde" and responses[0].json()["by"] == "handle"
    assert responses[1].body == b"pong" and not closed


def test_direct_head_204_http10_and_connection_close(direct):
    with direct.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"HEAD /direct/echo HTTP/1.1\r\nHost: x\r\n\r\nPOST /direct/empty HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        head = reader.response(head=True)
        assert head.status == 200 and int(head.headers["content-length"]) > 0
        empty = reader.response()
        assert empty.status == 204 and "content-length" not in empty.headers and empty.headers["x-seen"] == "POST"
    responses, closed = exchange(direct, b"GET /direct/echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert responses[0].headers["connection"] == "keep-alive" and not closed
    responses, closed = exchange(direct, b"GET /direct/echo HTTP/1.0\r\n\r\n")
    assert responses[0].status == 200 and closed
    responses, closed = exchange(direct, b"GET /direct/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert responses[0].headers["connection"] == "close" and closed


def test_direct_failures_are_500_and_the_connection_serves_on(direct):
    raw = b"GET /direct/boom HTTP/1.1\r\nHost: x\r\n\r\nGET /direct/framed HTTP/1.1\r\nHost: x\r\n\r\nGET /direct/echo HTTP/1.1\r\nHost: x\r\n\r\n"
    responses, closed = exchange(direct, raw, count=3)
    assert [r.status for r in responses] == [500, 500, 200] and not closed


def test_direct_limits_still_apply(direct):
    responses, closed = exchange(direct, b"POST /direct/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
    assert responses[0].status == 413 and closed


def test_direct_answer_in_flight_when_draining_says_connection_close():
    proc = ServerProcess(TEST_DIRECT="1", TAFE_DRAIN_GRACE_S="0.5")
    try:
        with proc.connect() as busy:
            busy.sendall(b"GET /direct/slow HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)  # in the handle now
            proc.proc.send_signal(signal.SIGTERM)
            busy.settimeout(10)
            reader = Reader(busy)
            resp = reader.response()
            assert resp.status == 200 and resp.headers["connection"] == "close"
            assert reader.closed()
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()
