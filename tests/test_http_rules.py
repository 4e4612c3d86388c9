"""The HTTP/1.1 rules of ``tafe.http`` alone: no sockets, no server, bytes in and out."""

from __future__ import annotations

import pytest

from tafe import http


def test_reader_pipelined_batch_then_partial_head_is_not_mistaken_for_a_big_head():
    reader = http.RequestReader(max_head_bytes=200, max_body_bytes=100)
    assert reader.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n", 1.0) == []
    batch = b"\r\n" + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n" * 20 + b"GET /c HTTP/1.1\r\nHo"
    assert len(reader.feed(batch, 2.0)) == 21
    assert reader.error is None and reader.in_progress and reader.arrival == 2.0
    [last] = reader.feed(b"st: x\r\n\r\n", 3.0)
    assert last.target == b"/c" and last.arrival == 2.0


def test_reader_head_trickling_past_the_limit_is_431_before_it_ends():
    reader = http.RequestReader(max_head_bytes=200, max_body_bytes=100)
    reader.feed(b"GET / HTTP/1.1\r\n", 0.0)
    for _ in range(30):
        reader.feed(b"X-A: b\r\n", 0.0)
    assert reader.error is not None and reader.error.status == 431


def test_reader_expect_continue_only_while_the_body_is_awaited():
    reader = http.RequestReader(1000, 1000)
    reader.feed(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", 0.0)
    assert reader.send_continue
    reader.feed(b"ok", 0.0)
    assert not reader.send_continue
    reader = http.RequestReader(1000, 1000)
    reader.feed(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok", 0.0)
    assert not reader.send_continue
    reader = http.RequestReader(1000, 1000)
    reader.feed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", 0.0)
    assert not reader.send_continue


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "pieces",
    [
        [CHUNKED_HEAD + b"1001\r\n"],  # one chunk above the cap, none of it sent
        [CHUNKED_HEAD, b"1001;ext=1\r\nabc"],
        [CHUNKED_HEAD + b"800\r\n" + b"a" * 0x800 + b"\r\n", b"801\r\n"],  # 4097 in total
        [CHUNKED_HEAD + b"0" * 100, b"0000", b"1", b"001\r", b"\n"],  # the size line over reads
    ],
)
def test_reader_chunk_size_past_the_cap_is_413_before_its_bytes(pieces):
    reader = http.RequestReader(max_head_bytes=1000, max_body_bytes=4096)
    for piece in pieces:
        assert reader.error is None
        reader.feed(piece, 0.0)
    assert reader.error is not None and reader.error.status == 413


@pytest.mark.parametrize(
    "pieces",
    [
        [CHUNKED_HEAD + b"1000\r\n"],  # exactly the cap: wait for it
        [CHUNKED_HEAD + b"800\r\n" + b"a" * 0x800 + b"\r\n", b"800\r\n", b"a" * 100],
        [CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nX-Trailer-Ffff: 1\r\n"],  # a trailer is no size line
        [CHUNKED_HEAD + b"5\r\nhello\r\n0\r\nFfff:1\r\n"],
    ],
)
def test_reader_chunked_body_within_the_cap_is_awaited(pieces):
    reader = http.RequestReader(max_head_bytes=1000, max_body_bytes=4096)
    for piece in pieces:
        assert reader.feed(piece, 0.0) == []
    assert reader.error is None and reader.in_progress


def test_reader_transfer_coding_other_than_chunked_is_501():
    for coding in (b"gzip, chunked", b"gzip", b"identity"):
        reader = http.RequestReader(1000, 1000)
        reader.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + coding + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 0.0)
        assert reader.error is not None and reader.error.status == 501, coding
    reader = http.RequestReader(1000, 1000)
    [request] = reader.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED \r\n\r\n3\r\nabc\r\n0\r\n\r\n", 0.0)
    assert request.body == b"abc" and reader.error is None


@pytest.mark.parametrize(
    "status, headers, length, keep_alive, http11, expect_lines, expect_framing, expect_alive",
    [
        ("200 OK", [("A", "b")], 5, True, True, ["A: b", "Content-Length: 5"], 5, True),
        ("204 No Content", [], 0, True, True, [], 0, True),
        ("304 Not Modified", [], 0, True, True, [], 0, True),
        # RFC 9110 8.6: never a length on a 204; a 304 may state the representation's.
        ("204 No Content", [("Content-Length", "0"), ("A", "b")], 0, True, True, ["A: b"], 0, True),
        ("304 Not Modified", [("Content-Length", "7")], 0, True, True, ["Content-Length: 7"], 0, True),
        ("200 OK", [("Content-Length", "3")], None, True, True, ["Content-Length: 3"], 3, True),
        ("200 OK", [], None, True, True, ["Transfer-Encoding: chunked"], http.CHUNKED, True),
        ("200 OK", [], None, True, False, ["Connection: close"], http.UNTIL_CLOSE, False),
        ("200 OK", [], 1, True, False, ["Content-Length: 1", "Connection: keep-alive"], 1, True),
        ("200 OK", [("Connection", "close")], 1, True, True, ["Content-Length: 1", "Connection: close"], 1, False),
        ("200 OK", [("Transfer-Encoding", "chunked")], 1, True, True, ["Content-Length: 1"], 1, True),
    ],
)
def test_response_head_framing(status, headers, length, keep_alive, http11, expect_lines, expect_framing, expect_alive):
    head, framing, alive = http.response_head(status, headers, length, keep_alive, http11, 0.0)
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == f"HTTP/1.1 {status}" and lines[1].startswith("Date: Thu, 01 Jan 1970")
    assert lines[2:] == expect_lines + ["", ""]
    assert (framing, alive) == (expect_framing, expect_alive)


def test_response_head_refuses_a_bad_status():
    with pytest.raises(ValueError):
        http.response_head("OK", [], 0, True, True, 0.0)
