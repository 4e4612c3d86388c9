"""Hostile input over real sockets: each gets its clear answer and nothing is lost.

After every attack the same process (same PID) still answers a good bid request,
and the refusals are counted in /metrics.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
from conftest import shared_examples
from test_examples_http import check_response, post

GOOD = shared_examples()[0].read_bytes()


def still_serving(server) -> None:
    assert server.proc.poll() is None, server.output()
    status, _, body = post(server.url, GOOD)
    check_response(json.loads(GOOD), status, body)


def raw_exchange(url: str, payload: bytes, timeout: float = 10.0) -> bytes:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks):
                break
        return b"".join(chunks)


class _Keys:
    """``KEYS % where``: a bid request with 100,000 keys at ``where``'s ``%s`` (~1 MB, ~220 KB gzipped)."""

    def __mod__(self, where: bytes) -> bytes:
        keys = b",".join(b'"%d":0' % i for i in range(100_000))
        return b'{"id":"x",' + where.replace(b"%s", keys) + b"}"


KEYS = _Keys()


def deep(n: int) -> bytes:
    return b'{"id":"x","imp":[{"id":"1","banner":{"w":300,"h":250}}],"ext":' + b"[" * n + b"]" * n + b"}"


@pytest.mark.parametrize(
    "name, body, headers, expected",
    [
        ("truncated_json", GOOD[: len(GOOD) // 2], {}, {400}),
        ("not_an_object", b"[1,2,3]", {}, {400}),
        ("empty_body", b"", {}, {400}),
        ("deep_nesting", deep(100_000), {}, {400, 413}),
        ("wrong_types", b'{"id": 5, "imp": "many"}', {}, {400}),
        ("imp_without_id", b'{"id": "a", "imp": [{"banner": {"w": 300, "h": 250}}]}', {}, {400}),
        ("non_utf8", b'{"id": "\xff\xfe", "imp": [{"id": "1"}]}', {}, {400}),
        ("ten_megabytes", b'{"id":"' + b"a" * (10 * 1024 * 1024) + b'"}', {}, {413}),
        ("gzip_bomb", gzip.compress(b"{" + b" " * (64 * 1024 * 1024) + b"}"), {"Content-Encoding": "gzip"}, {413, 400}),
        ("bad_gzip", b"\x1f\x8b not really gzip", {"Content-Encoding": "gzip"}, {400}),
        ("native_request_100000_keys", gzip.compress(KEYS % b'"imp":[{"id":"1","native":{"request":{%s}}}]'), {"Content-Encoding": "gzip"}, {400}),
        ("user_ext_100000_keys", gzip.compress(KEYS % b'"imp":[{"id":"1","banner":{"w":300,"h":250}}],"user":{"ext":{"eids":[],%s}}'), {"Content-Encoding": "gzip"}, {400}),
    ],
)
def test_hostile_body_gets_a_clear_refusal(tafe_server, name, body, headers, expected):
    try:
        status, _, _ = post(tafe_server.url, body, headers)
    except (ConnectionError, http.client.HTTPException) as exc:  # a 413 may close before the body is read
        pytest.fail(f"{name}: connection failed instead of a clear answer: {exc!r}")
    assert status in expected, (name, status)
    still_serving(tafe_server)


def test_slow_client_does_not_hold_up_others(tafe_server):
    parts = urlsplit(tafe_server.url)
    slow = socket.create_connection((parts.hostname, parts.port), timeout=30)
    try:
        slow.sendall(b"POST /openrtb2/bid HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"id\":")
        started = time.monotonic()
        for _ in range(5):
            still_serving(tafe_server)
        assert time.monotonic() - started < 10
    finally:
        slow.close()


def test_garbage_request_line_gets_400(tafe_server):
    answer = raw_exchange(tafe_server.url, b"\x16\x03\x01 hello garbage\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.0 400"), answer[:100]
    still_serving(tafe_server)


def test_get_on_bid_route_is_405(tafe_server):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(tafe_server.url + "/openrtb2/bid", timeout=10)
    assert err.value.code == 405


def test_refusals_are_counted_in_metrics(tafe_server):
    post(tafe_server.url, b"not json at all")
    text = urllib.request.urlopen(tafe_server.admin_url + "/metrics", timeout=10).read().decode()
    counted = [line for line in text.splitlines() if line.startswith("tafe_bad_requests_total{")]
    assert counted and sum(float(line.rsplit(" ", 1)[1]) for line in counted) >= 1, counted


def test_chunked_framing_attacks_get_their_answer_at_once_and_are_counted(tafe_server):
    head = b"POST /openrtb2/bid HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: %s\r\n\r\n"
    started = time.monotonic()
    answer = raw_exchange(tafe_server.url, head % b"chunked" + b"7fffffff\r\n{", timeout=8)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert time.monotonic() - started < 5  # not the read timeout (10 s)
    answer = raw_exchange(tafe_server.url, head % b"gzip, chunked" + b"3\r\nabc\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 501"), answer[:100]
    text = urllib.request.urlopen(tafe_server.admin_url + "/metrics", timeout=10).read().decode()
    assert 'tafe_bad_requests_total{reason="unknown_transfer_coding"} 1.0' in text
    still_serving(tafe_server)
