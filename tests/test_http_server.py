"""TAFE's HTTP/1.1 server over real sockets: the request corpus, and behaviour that needs a conversation.

``tests/raw_http.py`` starts the server process and speaks raw HTTP to it; the server's
life cycle (shared listeners, a full pool, draining) is in ``test_http_server_lifecycle.py``,
its fast path in ``test_http_fast_path.py``.
"""

from __future__ import annotations

import time

import pytest
from raw_http import CORPUS, Reader, ServerProcess, exchange, load_case

from tafe import http


@pytest.fixture(scope="module", params=["wsgi", "fast"])
def server(request):
    """The test app as plain WSGI, and with a fast path (``handle``) that leaves these
    paths to WSGI: every request then goes through the server's C hot loop first
    (tafe._fastpath), which must hand it over untouched, with the same answers."""
    proc = ServerProcess(**({"TEST_DIRECT": "1"} if request.param == "fast" else {}))
    yield proc
    proc.stop()


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
