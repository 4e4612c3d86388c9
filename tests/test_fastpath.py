"""The server's hot loop in C (``tafe._fastpath``) against the Python rules it stands in for
(``tafe.http``): what it reads, the environ it builds and the answer it frames must be
``tafe.http``'s own, and whatever it does not serve it must hand over untouched.

Requests: the shared OpenRTB bodies under several heads, hand-written edge cases, and
seeded mutations of them (byte flips, cuts, insertions)."""

from __future__ import annotations

import random
import socket
import sys
import time
from email.utils import formatdate
from types import SimpleNamespace

import pytest
from conftest import shared_examples

from tafe import _fastpath, http

MAX_HEAD, MAX_BODY = 2048, 64 * 1024


def reader_view(raw: bytes) -> tuple[list[http.Request], http.RequestReader]:
    reader = http.RequestReader(MAX_HEAD, MAX_BODY)
    try:
        requests = reader.feed(raw, 1.0)
    except http.HttpError as error:  # feed records errors; be safe either way
        reader.error = error
        requests = []
    return requests, reader


def assert_same_reading(raw: bytes) -> int:
    """C's reading of ``raw`` is tafe.http's, wherever C claims one; returns C's code."""
    got = _fastpath.parse(raw, MAX_HEAD, MAX_BODY)
    requests, reader = reader_view(raw)
    if isinstance(got, int):
        if got == 0:  # "not whole yet": tafe.http must not have refused it already
            assert reader.error is None, (raw, reader.error)
            assert not requests, raw
        return got
    end, method, target, headers, body, keep_alive, http11 = got
    # What follows the request (pipelined, or garbage) is the next request's business.
    requests, reader = reader_view(raw[:end])
    assert reader.error is None and len(requests) == 1 and not reader.in_progress, (raw, reader.error)
    first = requests[0]
    assert (method, target, body, keep_alive, http11) == (first.method, first.target, first.body, first.keep_alive, first.http11), raw
    assert headers == first.headers, raw
    return 1


def heads(body: bytes) -> list[bytes]:
    n = len(body)
    return [
        b"POST /openrtb2/bid HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % n,
        b"POST /openrtb2/bid/x?a=1&b=%%7E HTTP/1.1\r\nhost: a\r\nX-Openrtb-Version: 2.5\r\ncontent-length:%d\r\n\r\n" % n,
        b"POST /b HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: %d\r\nX-A: 1\r\nX-A: 2\r\n\r\n" % n,
        b"POST /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: %d\r\nX-Pad:  v \t\r\n\r\n" % n,
        b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nX_Under: 1\r\n\r\n" % n,
    ]


EDGE = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"OPTIONS /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET /%41 HTTP/1.1\r\nHost: a\r\n\r\n",  # percent-decoding: not here
    b"GET /a#f HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://a/b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"BREW / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: \x80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 999999\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, close\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: CLOSE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 3000 + b"\r\n\r\n",
    b"GET /" + b"p" * 3000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
]


def shared_bodies(limit: int = 60) -> list[bytes]:
    files = shared_examples()[:limit]
    return [p.read_bytes() for p in files if p.stat().st_size < MAX_BODY]


def test_simple_requests_read_as_tafe_http_reads_them():
    bodies = shared_bodies()
    assert bodies, "no shared OpenRTB requests found"
    served = 0
    for body in bodies:
        for head in heads(body):
            served += assert_same_reading(head + body) == 1
    # Only the heads with a "_" header... are still simple: every one of these is served.
    assert served == len(bodies) * 5


@pytest.mark.parametrize("raw", EDGE, ids=range(len(EDGE)))
def test_edge_cases_are_read_alike_or_handed_over(raw):
    code = assert_same_reading(raw)
    simple = raw.startswith((b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET / HTTP/1.0\r\n\r\n", b"HEAD /x", b"OPTIONS /x"))
    simple = simple or raw.endswith(b"Connection: CLOSE\r\n\r\n")
    assert (code == 1) == simple, (code, raw)


def test_every_prefix_is_either_waited_for_or_handed_over_at_once():
    """A request cut anywhere is "not whole yet" only while tafe.http still accepts it;
    garbage is handed over as soon as it shows, not after the read timeout."""
    samples = [h + b for b in shared_bodies(3) for h in heads(b)[:2]] + EDGE
    for raw in samples:
        for cut in range(len(raw)):
            assert_same_reading(raw[:cut])


def test_mutated_requests_are_read_alike_or_handed_over():
    rng = random.Random(20261206)
    seeds = [h + b for b in shared_bodies(5) for h in heads(b)] + EDGE
    fills = b"\x00\t\n\r :;,/?#%_-AZaz09\x7f\x80\xff"
    checked = 0
    for n in range(10000):
        raw = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            span = len(raw) if n % 2 else min(len(raw), 200)  # half in the head, half anywhere
            at = rng.randrange(0, span) if raw else 0
            op = rng.random()
            if op < 0.4 and raw:
                raw[at] = rng.choice(fills)
            elif op < 0.7:
                raw[at:at] = bytes([rng.choice(fills)])
            elif raw:
                del raw[at]
        assert_same_reading(bytes(raw))
        checked += 1
    assert checked == 10000


# --- Conn over a socketpair: environ and framing as tafe.http builds them ------------------


class Served:
    def __init__(self, answer=("200 OK", [("Content-Type", "application/json")], b'{"ok":1}')) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, dict]] = []

    def __call__(self, method, path, env):
        self.calls.append((method, path, env))
        return self.answer(method, path, env) if callable(self.answer) else self.answer


def pair(handle, closing=False, base=None, outbox=None):
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    server = SimpleNamespace(says_close=closing)  # tafe.server.Server.says_close
    base = base if base is not None else {"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.url_scheme": "http"}
    conn = _fastpath.Conn(ours.fileno(), handle, base, server, MAX_HEAD, MAX_BODY, outbox)
    return conn, ours, theirs, server


def read_all(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def without_date(raw: bytes) -> tuple[bytes, bytes]:
    lines = raw.split(b"\r\n")
    dates = [line for line in lines if line.startswith(b"Date: ")]
    assert len(dates) == 1
    return b"\r\n".join(line for line in lines if not line.startswith(b"Date: ")), dates[0]


def test_environ_is_direct_environs_and_the_answer_direct_heads():
    body = shared_bodies(1)[0]
    for head in heads(body):
        raw = head + body
        handle = Served()
        conn, ours, theirs, _ = pair(handle)
        with ours, theirs:
            theirs.sendall(raw)
            before = time.monotonic()
            code = conn.step()
            assert code == (_fastpath.CLOSE if b"Connection: close" in head or b"HTTP/1.0" in head and b"keep-alive" not in head else _fastpath.DONE)
            (request,), _ = reader_view(raw)
            method, path, env = handle.calls[0]
            _, want_path, _ = http.split_target(request.target)
            want = http.direct_environ(request, {"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.url_scheme": "http"}, want_path)
            assert before - 1 < env.pop("tafe.arrival") <= time.monotonic()
            want.pop("tafe.arrival")
            assert (method, path, env) == (request.method, want_path, want)
            status, headers, answer = handle.answer
            want_head, _ = http.direct_head(status, headers, len(answer), code == _fastpath.DONE, request.http11, time.time())
            got = read_all(theirs)
            got_rest, got_date = without_date(got)
            want_rest, _ = without_date(want_head + answer)
            assert got_rest == want_rest
            assert got_date.decode() in {f"Date: {formatdate(int(time.time()) - d, usegmt=True)}" for d in (0, 1)}
            assert conn.bytes_out == len(answer) and conn.status == "200 OK" and conn.buffered == 0


@pytest.mark.parametrize(
    "answer, head_only",
    [
        (("204 No Content", [("X-Seen", "1")], b""), True),
        (("304 Not Modified", [], b"ignored"), True),
        (("404 Not Found", [("Content-Type", "text/plain"), ("X-\xe9", "caf\xe9")], b"nope"), False),
    ],
)
def test_statuses_without_a_body_and_latin1_headers_frame_as_direct_head(answer, head_only):
    conn, ours, theirs, _ = pair(Served(answer))
    with ours, theirs:
        theirs.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.step() == _fastpath.DONE
        want, has_body = http.direct_head(answer[0], answer[1], len(answer[2]), True, True, time.time())
        assert has_body is not head_only
        got, _ = without_date(read_all(theirs))
        assert got == without_date(want + (b"" if head_only else answer[2]))[0]


def test_head_request_gets_the_head_only():
    conn, ours, theirs, _ = pair(Served())
    with ours, theirs:
        theirs.sendall(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.step() == _fastpath.DONE
        got = read_all(theirs)
        assert got.endswith(b"Content-Length: 8\r\n\r\n") and conn.bytes_out == 0


@pytest.mark.parametrize(
    "bad, error",
    [
        (("200 OK", [("Content-Length", "3")], b"abc"), ValueError),
        (("200 OK", [("connection", "close")], b"abc"), ValueError),
        (("2x0 OK", [], b""), ValueError),
        (("200 OK", [], "text"), TypeError),
        (("200 OK", [("X", "\u20ac")], b""), ValueError),
        (("200 OK", []), TypeError),
    ],
)
def test_a_bad_answer_raises_after_consuming_its_request(bad, error):
    conn, ours, theirs, _ = pair(Served(bad))
    with ours, theirs:
        theirs.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises(error):
            conn.step()
        assert conn.method == "GET" and conn.target == b"/x" and conn.keep_alive
        assert read_all(theirs) == b""  # nothing half-sent: the server answers 500 itself
        assert conn.take() == b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"


def test_waits_splits_pipelining_wsgi_and_handover():
    handle = Served(lambda m, p, e: None if p == "/ping" else ("200 OK", [], p.encode()))
    conn, ours, theirs, server = pair(handle)
    with ours, theirs:
        assert conn.step() == _fastpath.WAIT and conn.buffered == 0
        raw = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"
        for byte in raw[:-1]:  # a request arriving byte by byte is waited for, not refused
            theirs.sendall(bytes([byte]))
            assert conn.step() == _fastpath.WAIT
        assert conn.buffered == len(raw) - 1 and conn.arrival > 0
        theirs.sendall(raw[-1:] + b"GET /b HTTP/1.1\r\nHost: a\r\n\r\nGET /ping HTTP/1.1\r\nHost: a\r\n\r\nGET /c HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.step() == _fastpath.DONE and conn.step() == _fastpath.DONE
        assert conn.step() == _fastpath.WSGI  # handle left it: its bytes are handed over, whole
        assert conn.take(conn.request_end) == b"GET /ping HTTP/1.1\r\nHost: a\r\n\r\n"
        server.says_close = True  # a drain began: decided after the app ran, this answer closes
        assert conn.step() == _fastpath.CLOSE
        assert read_all(theirs).count(b"HTTP/1.1 200 OK") == 3
        assert [c[1] for c in handle.calls] == ["/a", "/b", "/ping", "/c"]
        theirs.sendall(b"POST /d HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n")
        assert conn.step() == _fastpath.GENERAL
        assert conn.take() == b"POST /d HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n"
        theirs.shutdown(socket.SHUT_WR)
        assert conn.step() == _fastpath.GONE


def test_an_answer_the_socket_cannot_take_at_once_is_left_to_send():
    big = b"z" * (8 << 20)
    conn, ours, theirs, _ = pair(Served(("200 OK", [], big)))
    with ours, theirs:
        theirs.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.step() == _fastpath.UNSENT
        rest = conn.take_unsent()
        got = read_all(theirs)
        assert 0 < len(rest) < len(big) and got.endswith(big[: len(got) - got.index(b"\r\n\r\n") - 4])
        assert len(got) - got.index(b"\r\n\r\n") - 4 + len(rest) == len(big)
        assert conn.take_unsent() == b""


def test_handle_may_change_its_environ():
    def handle(method, path, env):
        env.clear()  # the path it was given stays valid
        return "200 OK", [], path.encode()

    conn, ours, theirs, _ = pair(handle)
    with ours, theirs:
        theirs.sendall(b"GET /mine HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.step() == _fastpath.DONE
        assert read_all(theirs).endswith(b"\r\n\r\n/mine")


def test_repeated_headers_join_as_tafe_http_joins_them_even_over_the_base():
    handle = Served()
    conn, ours, theirs, _ = pair(handle, base={"HTTP_X_A": "base", "HTTP_X_N": 5})
    with ours, theirs:
        theirs.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /y HTTP/1.1\r\nHost: a\r\nX-N: 1\r\n\r\n")
        assert conn.step() == _fastpath.DONE
        assert handle.calls[0][2]["HTTP_X_A"] == "base,1,2"
        with pytest.raises(TypeError):  # as tafe.http's ``env[key] + "," + text`` would
            conn.step()


def test_an_idle_connection_holds_no_buffer():
    conn, ours, theirs, _ = pair(Served())
    with ours, theirs:
        theirs.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\nGET /y HTTP/1.1")
        assert conn.step() == _fastpath.DONE and conn.capacity > 0  # /y has begun: kept
        assert conn.step() == _fastpath.WAIT and conn.capacity > 0 and conn.buffered == 15
        theirs.sendall(b"\r\nHost: a\r\n\r\n")
        assert conn.step() == _fastpath.DONE
        assert conn.step() == _fastpath.WAIT and conn.capacity == 0 and conn.buffered == 0
        theirs.sendall(b"GET /z HTTP/1.1\r\nHost: a\r\n\r\n")  # and reads again after
        assert conn.step() == _fastpath.DONE and read_all(theirs).count(b"200 OK") == 3


# --- the outbox: answers of many connections sent together ---------------------------


def echo(method, path, env):
    return "200 OK", [("Content-Type", "text/plain")], path.encode()


def test_held_answers_leave_together_when_flushed():
    box = _fastpath.Outbox(10.0)
    (a, a_ours, a_theirs, _), (b, b_ours, b_theirs, _) = pair(echo, outbox=box), pair(echo, outbox=box)
    with a_ours, a_theirs, b_ours, b_theirs:
        a_theirs.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        b_theirs.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert a.step() == _fastpath.DONE and b.step() == _fastpath.DONE
        assert read_all(a_theirs) == b"" and read_all(b_theirs) == b""  # held, both
        assert a.held and b.held and box.held == 2 and box.answers == 2 and box.batches == 0
        box.flush()
        assert read_all(a_theirs).endswith(b"\r\n\r\n/a") and read_all(b_theirs).endswith(b"\r\n\r\n/b")
        assert not a.held and not b.held and box.held == 0 and box.batches == 1


def test_once_the_oldest_is_due_the_next_step_or_answer_sends_all_held():
    def handle(method, path, env):
        if path == "/slow":
            time.sleep(0.06)  # the held answer falls due while this one is made
        return echo(method, path, env)

    box = _fastpath.Outbox(0.05)
    (a, a_ours, a_theirs, _), (b, b_ours, b_theirs, _) = pair(handle, outbox=box), pair(handle, outbox=box)
    with a_ours, a_theirs, b_ours, b_theirs:
        a_theirs.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert a.step() == _fastpath.DONE and read_all(a_theirs) == b""
        assert b.step() == _fastpath.WAIT and box.held == 1  # not due yet: still held
        time.sleep(0.06)
        assert b.step() == _fastpath.WAIT  # a connection with nothing to answer sends the due ones
        assert read_all(a_theirs).endswith(b"/a") and box.held == 0 and box.batches == 1
        a_theirs.sendall(b"GET /a2 HTTP/1.1\r\nHost: x\r\n\r\n")
        b_theirs.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        assert a.step() == _fastpath.DONE and box.held == 1
        assert b.step() == _fastpath.DONE  # /a2 fell due meanwhile: both go now
        assert read_all(a_theirs).endswith(b"/a2") and read_all(b_theirs).endswith(b"/slow")
        assert box.held == 0 and box.answers == 2 and box.batches == 2


def test_a_connections_next_step_sends_its_held_answer_first_so_order_is_kept():
    box = _fastpath.Outbox(10.0)
    conn, ours, theirs, _ = pair(echo, outbox=box)
    with ours, theirs:
        theirs.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.step() == _fastpath.DONE and read_all(theirs) == b""
        assert conn.step() == _fastpath.DONE  # /1 went before /2 was read; /2 is held
        first = read_all(theirs)
        assert first.endswith(b"\r\n\r\n/1") and first.count(b"HTTP/1.1 200") == 1 and conn.held
        assert conn.send_held() is True and read_all(theirs).endswith(b"\r\n\r\n/2") and box.held == 0


def test_an_answer_that_closes_its_connection_is_never_held():
    box = _fastpath.Outbox(10.0)
    conn, ours, theirs, _ = pair(echo, outbox=box)
    with ours, theirs:
        theirs.sendall(b"GET /bye HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert conn.step() == _fastpath.CLOSE and box.held == 0
        assert read_all(theirs).endswith(b"\r\n\r\n/bye")


def test_a_held_answer_whose_client_left_makes_the_next_step_gone():
    box = _fastpath.Outbox(10.0)
    conn, ours, theirs, _ = pair(echo, outbox=box)
    with ours:
        theirs.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.step() == _fastpath.DONE
        theirs.close()
        box.flush()  # its send fails: the client is gone
        assert box.held == 0 and conn.step() == _fastpath.GONE
        assert conn.send_held() is False


def test_a_held_answer_the_socket_cannot_take_whole_comes_back_unsent():
    big = b"z" * (8 << 20)
    box = _fastpath.Outbox(10.0)
    conn, ours, theirs, _ = pair(lambda m, p, e: ("200 OK", [], big), outbox=box)
    with ours, theirs:
        theirs.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        assert conn.step() == _fastpath.DONE and conn.held
        box.flush()
        got = read_all(theirs)
        assert conn.step() == _fastpath.UNSENT
        rest = conn.take_unsent()
        assert 0 < len(rest) and got[got.index(b"\r\n\r\n") + 4 :] + rest == big


def test_outbox_and_conn_refuse_bad_arguments():
    with pytest.raises(ValueError, match="hold"):
        _fastpath.Outbox(0.0)
    with pytest.raises(TypeError, match="Outbox"):
        pair(echo, outbox=object())


def test_a_refused_reinit_leaves_a_held_answer_going_to_its_own_client():
    box = _fastpath.Outbox(10.0)
    conn, ours, theirs, server = pair(echo, outbox=box)
    other_ours, other_theirs = socket.socketpair()
    with ours, theirs, other_ours, other_theirs:
        theirs.sendall(b"GET /mine HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.step() == _fastpath.DONE and conn.held
        with pytest.raises(RuntimeError, match="holds an answer"):
            conn.__init__(other_ours.fileno(), echo, {}, server, MAX_HEAD, MAX_BODY, box)
        with pytest.raises(TypeError, match="Outbox"):
            conn.__init__(other_ours.fileno(), echo, {}, server, MAX_HEAD, MAX_BODY, object())
        box.flush()
        assert read_all(theirs).endswith(b"/mine") and read_all(other_theirs) == b""


def test_a_flush_from_a_connection_freed_by_a_flush_leaves_the_others_intact():
    box = _fastpath.Outbox(10.0)

    class Handle:  # freed with its connection, inside the outbox's flush
        def __call__(self, method, path, env):
            return echo(method, path, env)

        def __del__(self):
            box.flush()

    a, a_ours, a_theirs, _ = pair(Handle(), outbox=box)
    b, b_ours, b_theirs, _ = pair(echo, outbox=box)
    with a_ours, a_theirs, b_ours, b_theirs:
        a_theirs.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        b_theirs.sendall(b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        assert a.step() == _fastpath.DONE and b.step() == _fastpath.DONE
        before = sys.getrefcount(b)
        del a  # the outbox holds its last reference
        box.flush()
        assert sys.getrefcount(b) == before - 1  # the outbox's one reference, dropped once
        assert read_all(a_theirs).endswith(b"/a") and read_all(b_theirs).endswith(b"/b")
        b_theirs.sendall(b"GET /b2 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b.step() == _fastpath.DONE and b.send_held() and read_all(b_theirs).endswith(b"/b2")
