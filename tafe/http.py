"""HTTP/1.1 request and response rules as a pure state machine: no sockets, no gevent.

The shell (``tafe.server``) feeds it the bytes it reads and writes the bytes it
returns; everything about what is a valid request and how an answer is framed lives
here, so it can be tested without a network. Parsing is done by ``httptools``
(llhttp, Node's C parser); this module adds TAFE's rules on top.

Rules, on the way in (``RequestReader``):

- Bytes are fed as they arrive; each ``feed`` returns the requests it completed, in
  order. Several requests in one read (pipelining) come out together; a request split
  over many reads comes out when its last byte arrives.
- A request's body is framed by ``Content-Length`` or ``Transfer-Encoding: chunked``
  (both at once is malformed). Chunked trailers are read and ignored. Any other
  transfer coding (``gzip, chunked``...) is 501, as Nginx answers (RFC 9112 6.1): its
  body would reach the app still encoded.
- The head (request line + headers) may hold at most ``max_head_bytes``: more is 431.
  The body may hold at most ``max_body_bytes``: more is 413, decided as soon as a
  ``Content-Length``, or a chunk size line, says so, before the body is read (a client
  announcing a huge chunk and then waiting gets its 413 at once, not a 408 later).
  Anything llhttp rejects is 400.
  After an error the reader is dead (``error`` is set): the shell answers it and closes.
- An HTTP/1.1 request has exactly one ``Host`` header, and an HTTP/1.0 one at most one
  (RFC 9112 3.2): otherwise 400. So is an HTTP/0.9 request line (llhttp accepts it).
- Keep-alive follows llhttp: HTTP/1.1 unless ``Connection: close``; HTTP/1.0 only with
  ``Connection: keep-alive``. After a request that does not keep the connection alive
  (or an ``Upgrade``/``CONNECT``, which TAFE does not speak), later bytes are ignored
  and flagged (``discarded``), so that the shell closes gently.
- ``Expect: 100-continue`` on a request whose body has not arrived yet sets
  ``send_continue``: the shell writes ``CONTINUE`` after answering every request
  completed before it (interim answers must not overtake earlier responses), then
  clears the flag.
- Each request carries ``arrival``: the clock value passed to the ``feed`` that
  delivered its first byte (the bid deadline is measured from it).

The WSGI view (``wsgi_environ``): ``PATH_INFO`` is percent-decoded then read as
latin-1 (PEP 3333), without any ``#fragment``; header names containing "_" are dropped
(they would alias their "-" twins); ``CONTENT_LENGTH`` is the length of the body read,
whatever its framing.

Rules, on the way out (``response_head``):

- Status line, headers and (by the shell) body go out as one bytes object, one write.
- A finite body always gets ``Content-Length``; 1xx, 204 and 304 get no body and no
  length. A streamed body of unknown length is chunked on HTTP/1.1 and delimited by
  closing the connection on HTTP/1.0. A ``Content-Length`` given by the app is kept,
  except on 1xx and 204, where RFC 9110 (8.6) forbids one.
- The app's own ``Connection`` and ``Transfer-Encoding`` headers are dropped (framing
  and hop-by-hop headers are the server's);
  ``Connection: close`` from the app closes the connection after the answer.
- ``Date`` is formatted once per second.
- An app's fast path (``direct_head``) follows the same rules for a whole answer whose
  framing it leaves to the server (it may not send the headers above).
"""

from __future__ import annotations

from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from io import BytesIO
from itertools import chain
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools

__all__ = [
    "CONTINUE",
    "LAST_CHUNK",
    "HttpError",
    "Request",
    "RequestReader",
    "add_headers",
    "chunk",
    "direct_environ",
    "direct_head",
    "error_response",
    "response_head",
    "split_target",
    "wsgi_environ",
    "CHUNKED",
    "UNTIL_CLOSE",
]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


class HttpError(Exception):
    """A request TAFE refuses: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


class Request:
    """One complete request as read from the wire (names and values still bytes)."""

    __slots__ = ("method", "target", "headers", "body", "keep_alive", "http11", "arrival")

    def __init__(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        keep_alive: bool,
        http11: bool,
        arrival: float,
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.http11 = http11
        self.arrival = arrival

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target!r} body={len(self.body)}B keep_alive={self.keep_alive}>"


# Bytes of a head not passed to callbacks (request line spaces, ": ", CRLFs), roughly.
_LINE_OVERHEAD = 16
_HEADER_OVERHEAD = 4
_OWS = (b" ", b"\t")
_METHODS: dict[bytes, str] = {}


class RequestReader:
    """The request side of one connection; see the module docstring for its rules."""

    __slots__ = (
        "_parser", "_max_head", "_max_body", "_now", "_out", "_url", "_headers", "_body",
        "_body_len", "_head_len", "_in_head", "_fields", "_feed_len", "_begin_len",
        "_chunked", "_in_chunk", "_chunk_seen", "_chunk_got", "_size_line",
        "arrival", "in_progress", "send_continue", "closed", "discarded", "error",
    )

    def __init__(self, max_head_bytes: int, max_body_bytes: int) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._max_head = max_head_bytes
        self._max_body = max_body_bytes
        self._now = 0.0
        self._out: list[Request] = []
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._body_len = 0
        self._head_len = 0
        self._feed_len = 0
        self._begin_len = 0
        self._in_head = False
        self._fields: list[tuple[bytes, bytes]] = []
        self._chunked = False  # the request in progress has a chunked body
        self._in_chunk = False  # between a chunk's size line and its end
        self._chunk_seen = False  # a chunk size line was parsed in the current feed
        self._chunk_got = 0  # body bytes since the last chunk size line
        self._size_line = b""  # a chunk size line begun in an earlier feed
        self.arrival = 0.0
        self.in_progress = False  # a request has begun and is not complete yet
        self.send_continue = False
        self.closed = False  # no more requests will be read on this connection
        self.discarded = False  # bytes came after the last request and were ignored
        self.error: HttpError | None = None

    def feed(self, data: bytes, now: float) -> list[Request]:
        """Parse ``data`` read at clock ``now``; return the requests it completed."""
        if self.closed or self.error is not None:
            self.discarded = self.discarded or bool(data)
            return []
        self._now = now
        out = self._out = []
        self._feed_len = len(data)
        self._chunk_seen = False
        continued = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._close_after_last()
            self.discarded = exc.args[0] < len(data)  # the other protocol's bytes
        except httptools.HttpParserError as exc:
            if self.closed:
                self.discarded = True  # bytes after the last request, ignored
            elif self.error is None:
                cause = exc.__context__
                if isinstance(cause, HttpError):
                    self.error = cause
                else:
                    self.error = HttpError(400, str(exc) or "malformed request")
        else:
            # A head begun in an earlier read and still incomplete (nothing completed
            # in between, so it is the same head): count the raw bytes, so that a head
            # trickling in (or whitespace llhttp swallows) is refused as it arrives.
            if continued and self._in_head and not out:
                self._head_len += len(data)
                if self._head_len > self._max_head:
                    self.error = HttpError(431, "request head too large")
            elif self._chunked and self.in_progress:
                self._check_chunk(data)
        return out

    def _check_chunk(self, data: bytes) -> None:
        """After a read that left a chunked body unfinished: refuse it (413) if the chunk
        awaited would take the body past the cap, or keep a size line begun in it.

        llhttp does not tell the chunk size, so the size line is read here: it ends where
        the chunk's bytes received in this read begin, and starts after the previous LF
        (the head's or the previous chunk's). Leading zeros are dropped and the line cut
        short when kept, which can only make the size read smaller, never refuse a body
        that fits; a trailer line (after the last chunk) does not read as hex: size 0.
        """
        if not self._in_chunk:
            lf = data.rfind(b"\n")
            line = data[lf + 1:] if lf >= 0 else self._size_line + data
            self._size_line = line.lstrip(b"0")[:64]
            return
        if not self._chunk_seen:
            return  # this read only carried chunk bytes, counted by on_body
        end = len(data) - self._chunk_got - 2  # the size line's CRLF
        lf = data.rfind(b"\n", 0, end)
        line = data[lf + 1:end] if lf >= 0 else self._size_line + data[:end]
        try:
            size = int(line.lstrip(b"0")[:64].partition(b";")[0] or b"0", 16)
        except ValueError:
            return
        if self._body_len - self._chunk_got + size > self._max_body:
            self.error = HttpError(413, "request body too large")

    def _close_after_last(self) -> None:
        if self._out:
            self._out[-1].keep_alive = False
        self.closed = True

    # --- llhttp callbacks: kept lean, they run for every header of every request --------

    def on_message_begin(self) -> None:
        self.arrival = self._now
        self.in_progress = True
        self._in_head = True
        self._url = []
        self._headers = []
        self._body = []
        self._body_len = 0
        self._head_len = 0
        self._begin_len = self._feed_len
        self._chunked = False
        self._in_chunk = False
        self._size_line = b""

    def on_url(self, url: bytes) -> None:
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        headers = self._fields = self._headers
        self._headers = []  # chunked trailers land here and are ignored
        # The head lies within the reads it spans; measure it only if they are big.
        if self._begin_len + self._head_len + self._feed_len > self._max_head:
            size = sum(map(len, chain.from_iterable(headers))) + sum(map(len, self._url))
            if size + _LINE_OVERHEAD + _HEADER_OVERHEAD * len(headers) > self._max_head:
                raise HttpError(431, "request head too large")
        length = -1
        expect = False
        padded = False
        hosts = 0
        coding = None
        for name, value in headers:
            padded = padded or value.endswith(_OWS)  # llhttp keeps trailing whitespace
            n = len(name)
            if n == 14 or n == 6:
                name = name.lower()
                if name == b"content-length":
                    length = int(value)  # llhttp has checked it is digits
                elif name == b"expect":
                    expect = value.lower().rstrip(b" \t") == b"100-continue"
            elif n == 4 and name.lower() == b"host":
                hosts += 1
            elif n == 17 and name.lower() == b"transfer-encoding":
                coding = value.strip(b" \t").lower()  # llhttp refuses a second one
        if hosts != 1:
            version = self._parser.get_http_version()
            if version == "0.9":
                raise HttpError(400, "HTTP/0.9 is not served")
            if hosts or version != "1.0":
                raise HttpError(400, "missing or repeated Host header")
        if padded:
            headers[:] = [(name, value.rstrip(b" \t")) for name, value in headers]
        if length > self._max_body:
            raise HttpError(413, "request body too large")
        if coding is not None:
            if coding != b"chunked":
                raise HttpError(501, "transfer coding not implemented")
            self._chunked = True
        # With no body, on_message_complete follows at once and clears the flag again.
        if expect and length != 0 and self._parser.get_http_version() == "1.1":
            self.send_continue = True

    def on_chunk_header(self) -> None:
        self._in_chunk = True
        self._chunk_seen = True
        self._chunk_got = 0

    def on_chunk_complete(self) -> None:
        self._in_chunk = False

    def on_body(self, body: bytes) -> None:
        self.send_continue = False  # the client did not wait
        self._chunk_got += len(body)
        self._body_len += len(body)
        if self._body_len > self._max_body:
            raise HttpError(413, "request body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self._parser
        raw = parser.get_method()
        method = _METHODS.get(raw)
        if method is None:
            method = raw.decode("latin-1")
            if len(_METHODS) < 64:
                _METHODS[raw] = method
        url = self._url
        body = self._body
        keep_alive = parser.should_keep_alive()
        self._out.append(
            Request(
                method,
                url[0] if len(url) == 1 else b"".join(url),
                self._fields,
                (body[0] if len(body) == 1 else b"".join(body)) if body else b"",
                keep_alive,
                parser.get_http_version() == "1.1",
                self.arrival,
            )
        )
        self.in_progress = False
        self.send_continue = False
        self._chunked = False
        if not keep_alive or method == "CONNECT":
            self._close_after_last()


# --- the WSGI view of a request ------------------------------------------------------

# Header name (as sent) -> WSGI environ key; None drops it: a name with "_" could
# spoof another after the "-" -> "_" mapping (Nginx and gunicorn drop them too).
_ENV_KEYS: dict[bytes, str | None] = {}


def _env_key(name: bytes) -> str | None:
    text = name.decode("latin-1").upper()
    if "_" in text:
        key = None
    elif text == "CONTENT-TYPE" or text == "CONTENT-LENGTH":
        key = text.replace("-", "_")
    else:
        key = "HTTP_" + text.replace("-", "_")
    if len(_ENV_KEYS) < 1024:
        _ENV_KEYS[name] = key
    return key


def split_target(target: bytes) -> tuple[bytes, str, str]:
    """``(target without any #fragment, PATH_INFO, QUERY_STRING)`` as PEP 3333 reads them."""
    if b"#" in target:  # a fragment is the client's business; llhttp lets it through
        target = target.partition(b"#")[0]
    if target[:1] == b"/":
        path, _, query = target.partition(b"?")
    elif target == b"*":
        path, query = target, b""
    else:  # absolute-form, as sent to a proxy
        try:
            url = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            path, query = target, b""
        else:
            path, query = url.path or b"/", url.query or b""
    return target, (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1"), query.decode("latin-1")


def add_headers(env: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    """The request's headers as CGI keys (``HTTP_*``, ``CONTENT_TYPE``, ``CONTENT_LENGTH``),
    repeated ones joined with ","."""
    keys = _ENV_KEYS
    for name, value in headers:
        key = keys.get(name, "")
        if key == "":
            key = _env_key(name)
        if key is None:
            continue
        text = value.decode("latin-1")
        if key in env:
            text = env[key] + "," + text
        env[key] = text


def direct_environ(request: Request, base: dict[str, Any], path: str) -> dict[str, Any]:
    """What an app's ``handle`` gets (the server's fast path, ``tafe.server``): a copy of
    ``base`` (the server's name, port and URL scheme), ``REQUEST_METHOD``, ``PATH_INFO``,
    the headers as in ``wsgi_environ``, the body as ``tafe.body`` (whole, already read
    and capped) and ``tafe.arrival``: no query, no ``wsgi.*`` streams."""
    env = base.copy()
    env["REQUEST_METHOD"] = request.method
    env["PATH_INFO"] = path
    add_headers(env, request.headers)
    env["tafe.body"] = request.body
    env["tafe.arrival"] = request.arrival
    return env


def wsgi_environ(request: Request, base: dict[str, Any]) -> dict[str, Any]:
    """The PEP 3333 environ of ``request``: a copy of ``base`` (server and client keys)
    plus the request's own keys, ``wsgi.input`` over the body already read, and
    ``tafe.arrival``. Repeated headers are joined with ","."""
    env = base.copy()
    target, env["PATH_INFO"], env["QUERY_STRING"] = split_target(request.target)
    env["REQUEST_METHOD"] = request.method
    env["RAW_URI"] = target.decode("latin-1")
    env["SERVER_PROTOCOL"] = "HTTP/1.1" if request.http11 else "HTTP/1.0"
    add_headers(env, request.headers)
    body = request.body
    if body or "CONTENT_LENGTH" in env:
        env["CONTENT_LENGTH"] = str(len(body))  # the length read, chunked or not
    env["wsgi.input"] = BytesIO(body)
    env["tafe.arrival"] = request.arrival
    return env


# --- responses ------------------------------------------------------------------------

# Framing of a response body, as returned by response_head: a length >= 0 (from
# Content-Length, or 0 when the status allows no body), or one of these.
CHUNKED = -1  # Transfer-Encoding: chunked
UNTIL_CLOSE = -2  # HTTP/1.0 stream of unknown length: the end is the connection closing

# Status lines and the Date line, cached as text (response_head) and bytes (direct_head).
_STATUS_LINES: dict[str, tuple[str, int, bytes]] = {}
_date_second = -1
_date_lines = ("", b"")


def _status(status: str) -> tuple[str, int, bytes]:
    cached = _STATUS_LINES.get(status)
    if cached is None:
        try:
            code = int(status[:3])
        except ValueError:
            raise ValueError(f"bad WSGI status {status!r}") from None
        if not 100 <= code <= 999 or (len(status) > 3 and status[3] != " "):
            raise ValueError(f"bad WSGI status {status!r}")
        line = f"HTTP/1.1 {status}\r\n"
        cached = (line, code, line.encode("latin-1"))
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[status] = cached
    return cached


def _date(now: float) -> tuple[str, bytes]:
    global _date_second, _date_lines
    second = int(now)
    if second != _date_second:
        line = f"Date: {formatdate(second, usegmt=True)}\r\n"
        _date_lines = (line, line.encode("latin-1"))
        _date_second = second
    return _date_lines


def response_head(
    status: str,
    headers: Iterable[tuple[str, str]],
    body_length: int | None,
    keep_alive: bool,
    http11: bool,
    now: float,
) -> tuple[bytes, int, bool]:
    """Serialise a WSGI status and header list: ``(head bytes, framing, keep_alive)``.

    ``body_length`` is the length of a finite body, or None for a stream. ``now`` is
    wall-clock time (for ``Date``). ``framing`` is the number of body bytes the head
    announces (0 for statuses without a body), ``CHUNKED`` or ``UNTIL_CLOSE``.
    """
    line, code, _ = _status(status)
    parts = [line, _date(now)[0]]
    append = parts.append
    given = -1
    for name, value in headers:
        lname = name.lower()
        if lname == "connection":
            if "close" in value.lower():
                keep_alive = False
            continue
        if lname == "content-length":
            try:
                given = int(value)
            except ValueError:
                raise ValueError(f"bad Content-Length from the app: {value!r}") from None
            if code < 200 or code == 204:
                continue
        elif lname == "transfer-encoding":
            continue  # the server frames the body, not the app
        append(f"{name}: {value}\r\n")
    if code < 200 or code == 204 or code == 304:
        framing = 0
    elif given >= 0:
        framing = given
    elif body_length is not None:
        framing = body_length
        append(f"Content-Length: {body_length}\r\n")
    elif http11:
        framing = CHUNKED
        append("Transfer-Encoding: chunked\r\n")
    else:
        framing = UNTIL_CLOSE
        keep_alive = False
    if not keep_alive:
        append("Connection: close\r\n\r\n")
    elif not http11:
        append("Connection: keep-alive\r\n\r\n")
    else:
        append("\r\n")
    return "".join(parts).encode("latin-1"), framing, keep_alive


# The fast path's head (direct_head): header lines as bytes, by (name, value).
_HEADER_LINES: dict[tuple[str, str], bytes] = {}
_SERVER_FRAMED = ("connection", "content-length", "transfer-encoding")


def direct_head(
    status: str, headers: list[tuple[str, str]], body_length: int, keep_alive: bool, http11: bool, now: float
) -> tuple[bytes, bool]:
    """The head of a whole answer from an app's ``handle`` (no WSGI): ``(head, has_body)``.

    ``response_head``'s rules for an app that leaves the framing to the server: it may
    not send ``Connection``, ``Content-Length`` or ``Transfer-Encoding`` (ValueError);
    the length is ``body_length`` (none on 1xx, 204, 304). Status and header lines come
    from caches of their bytes, so a usual answer is one join.
    """
    _, code, line = _status(status)
    parts: list[bytes] = [line, _date(now)[1]]
    lines = _HEADER_LINES
    for header in headers:
        encoded = lines.get(header)
        if encoded is None:
            if header[0].lower() in _SERVER_FRAMED:
                raise ValueError(f"the app's handle may not frame its answer: {header[0]}")
            encoded = f"{header[0]}: {header[1]}\r\n".encode("latin-1")
            if len(lines) < 1024:
                lines[header] = encoded
        parts.append(encoded)
    has_body = not (code < 200 or code == 204 or code == 304)
    if has_body:
        parts.append(b"Content-Length: %d\r\n" % body_length)
    if not keep_alive:
        parts.append(b"Connection: close\r\n\r\n")
    elif not http11:
        parts.append(b"Connection: keep-alive\r\n\r\n")
    else:
        parts.append(b"\r\n")
    return b"".join(parts), has_body


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never call it with empty data: that ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(status: int, reason: str, now: float) -> bytes:
    """A whole response refusing a request before any app saw it; the connection closes."""
    phrase = HTTPStatus(status).phrase
    body = f"{reason}\n".encode("latin-1", "replace")
    head, _, _ = response_head(
        f"{status} {phrase}",
        [("Content-Type", "text/plain; charset=utf-8")],
        len(body),
        False,
        True,
        now,
    )
    return head + body
