"""The server's fast path over real sockets: an app with ``handle`` beside its WSGI side, as
TAFE's public app has (``tests/http/serve_app.py`` with ``TEST_DIRECT=1``)."""

from __future__ import annotations

import signal
import threading
import time

import pytest
from raw_http import Reader, ServerProcess, exchange


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


# --- the hot loop in C (tafe._fastpath) on a real server -------------------------------


def test_a_request_arriving_byte_by_byte_is_served_by_handle(direct):
    raw = b"POST /direct/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    with direct.connect() as sock:
        for i in range(len(raw)):
            sock.sendall(raw[i:i + 1])
            time.sleep(0.002)
        doc = Reader(sock).response().json()
    assert doc["by"] == "handle" and doc["body"] == "hi"


def test_garbage_after_a_served_request_is_400_not_a_wait_for_the_read_timeout(direct):
    responses, closed = exchange(direct, b"GET /direct/echo HTTP/1.1\r\nHost: x\r\n\r\nGET /\x01 HTTP/1.1\r\n", count=2)
    assert [r.status for r in responses] == [200, 400] and closed


def test_a_request_left_unfinished_is_408_after_the_read_timeout(direct):
    with direct.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"GET /direct/echo HTTP/1.1\r\nHost: x\r\n\r\nPOST /direct/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nabc")
        assert reader.response().status == 200
        assert reader.response().status == 408 and reader.closed()


def test_an_answer_bigger_than_the_socket_buffer_arrives_whole_to_a_slow_reader(direct):
    with direct.connect(timeout=20) as sock:
        sock.sendall(b"GET /direct/big HTTP/1.1\r\nHost: x\r\n\r\nGET /direct/echo HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)  # the server finds the socket full and has to wait for this reader
        reader = Reader(sock)
        big = reader.response()
        assert big.status == 200 and big.body == b"0123456789abcdef" * (1 << 19)
        assert reader.response().json()["by"] == "handle"


def test_requests_handle_leaves_or_cannot_be_read_in_c_do_not_end_the_fast_path(direct):
    raw = b"GET /direct/echo HTTP/1.1\r\nHost: x\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\nGET /direct/echo?a=%41 HTTP/1.1\r\nHost: x\r\n\r\n"
    raw += b"POST /direct/echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    raw += b"POST /direct/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nlast"
    responses, closed = exchange(direct, raw, count=5)
    assert [r.status for r in responses] == [200] * 5 and not closed
    assert responses[1].body == b"pong"
    docs = [responses[i].json() for i in (0, 2, 3, 4)]
    assert [d["by"] for d in docs] == ["handle"] * 4 and [d["body"] for d in docs] == ["", "", "ok", "last"]


def test_drain_closes_idle_fast_connections_and_still_reads_a_fresh_ones_first_request():
    # Keep-alive and read timeouts equal: "served a request yet" must not be told from the timeout in use.
    proc = ServerProcess(TEST_DIRECT="1", TAFE_DRAIN_GRACE_S="0.5", TAFE_READ_TIMEOUT_S="3", TAFE_KEEPALIVE_TIMEOUT_S="3")
    try:
        with proc.connect() as idle, proc.connect() as fresh:
            idle.sendall(b"GET /direct/echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(idle).response().json()["by"] == "handle"
            proc.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # past the grace: the listener is closed, the drain waits for fresh
            fresh.sendall(b"GET /direct/echo HTTP/1.1\r\nHost: x\r\n\r\n")
            reader = Reader(fresh)
            resp = reader.response()
            assert resp.json()["by"] == "handle" and resp.headers["connection"] == "close" and reader.closed()
            idle.settimeout(5)
            assert Reader(idle).closed()
        assert proc.proc.wait(10) == 0
    finally:
        proc.stop()


# --- answers held for a batch (send_batch_us, tafe._fastpath.Outbox) -------------------


@pytest.mark.parametrize("hold_us", ["5000", "0"])
def test_busy_connections_each_get_their_own_answers_in_order_whether_held_or_not(hold_us):
    proc = ServerProcess(TEST_DIRECT="1", TAFE_SEND_BATCH_US=hold_us)
    errors: list[str] = []

    def client(n: int) -> None:
        try:
            with proc.connect(timeout=10) as sock:
                reader = Reader(sock)
                for i in range(0, 40, 2):  # pairs: pipelined, so a held answer has one behind it
                    raw = b"".join(
                        b"POST /direct/echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                        for body in (b"%d-%d" % (n, i), b"%d-%d" % (n, i + 1))
                    )
                    sock.sendall(raw)
                    got = [reader.response().json()["body"] for _ in range(2)]
                    if got != [f"{n}-{i}", f"{n}-{i + 1}"]:
                        errors.append(f"connection {n} sent {i}, {i + 1} and got {got}")
                        return
        except Exception as exc:  # reported below, with the others
            errors.append(f"connection {n}: {type(exc).__name__}: {exc}")

    try:
        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        # A lone request on a quiet server is not held for company: it leaves once its
        # greenlet has yielded (held for good, Reader would time out here).
        responses, closed = exchange(proc, b"GET /direct/echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert responses[0].json()["by"] == "handle" and not closed
    finally:
        proc.stop()
