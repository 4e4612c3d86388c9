"""One client connection of ``tafe.server``: its read loops and the answers to its requests.

A connection is served by one greenlet. For an app with a fast path (``handle``), it
starts in the hot loop in C (``tafe._fastpath``): it reads, parses, builds ``handle``'s
environ, frames the answer and sends, with no Python in between, for any request within
a strict subset of ``tafe.http``'s rules (its header comment lists them). A request
``handle`` leaves goes to the WSGI app and the loop goes on; anything the subset does not
cover (chunked bodies, ``Expect``, a malformed or oversized request...) hands the
connection's bytes to the Python loop over ``tafe.http`` for the rest of the connection.
Waiting, timeouts, draining, 500s and the yields between requests are Python in both.
With the access log or the profiler on, the Python loop serves every request: both
read each request's fields and frames there.

Rules: an idle keep-alive connection closes after ``keepalive_timeout_s``; a request,
once its first byte is in, must be whole within ``read_timeout_s`` (else 408); a refused
request (400/408/413/431/501) is answered, counted and the connection closed gently
(lingering close); a response is one ``sendall``; a connection yields to the others
after every answer.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.socket import wait_read

from tafe import _fastpath, http

if TYPE_CHECKING:
    from tafe.server import Server

log = logging.getLogger("tafe.server")
access_log = logging.getLogger("tafe.access")

__all__ = ["Connection"]

_RECV = 64 * 1024
_LINGER_S = 2.0  # longest time spent draining a refused client before closing
_TEXT = [("Content-Type", "text/plain; charset=utf-8")]
_INTERNAL_ERROR = "500 Internal Server Error"
_INTERNAL_ERROR_BODY = b"internal server error\n"
_monotonic = time.monotonic
_time = time.time


def _internal_error(keep_alive: bool, http11: bool) -> tuple[bytes, bytes]:
    """Head and body of the 500 for an app's ``handle`` that raised (the fast paths)."""
    head, _ = http.direct_head(_INTERNAL_ERROR, _TEXT, len(_INTERNAL_ERROR_BODY), keep_alive, http11, _time())
    return head, _INTERNAL_ERROR_BODY


class Connection:
    """One client connection: its read loops, refusals and the WSGI calls for its requests."""

    __slots__ = (
        "server", "sock", "base", "reader", "idle", "timeout",
        "status", "headers", "head_sent", "keep_alive", "http11", "is_head",
        "remaining", "bytes_out",
    )

    def __init__(self, server: Server, sock: socket.socket, addr: Any) -> None:
        self.server = server
        self.sock = sock
        if server._tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.base = base = server.base_environ.copy()
        if isinstance(addr, tuple):
            base["REMOTE_ADDR"] = addr[0]
            base["REMOTE_PORT"] = str(addr[1])
        else:
            base["REMOTE_ADDR"] = ""
        settings = server.settings
        self.reader = http.RequestReader(settings.max_header_bytes, settings.max_body_bytes)
        # A new connection is not idle: it was opened to carry a request, maybe already
        # on its way. Closing it unread during a drain would fail that request (behind
        # Nginx: a 502 on a POST it may not retry), so it is read once even when closing.
        self.idle = False
        self.timeout = -1.0
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False
        self.keep_alive = True
        self.http11 = True
        self.is_head = False
        self.remaining = -1
        self.bytes_out = 0

    def shutdown(self) -> None:
        """Wake the read loop with end-of-stream so it closes the connection itself."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def sendall(self, data: bytes) -> None:
        """``socket.sendall`` without gevent's per-call SO_SNDBUF lookup and chunking:
        one ``send`` nearly always takes a whole response. The fast path's held answers
        go first: a turn of the Python path must not stretch their wait."""
        outbox = self.server.outbox
        if outbox is not None and outbox.held:
            outbox.flush()
        sent = self.sock.send(data)
        if sent < len(data):
            self.sock.sendall(memoryview(data)[sent:])

    def _settimeout(self, timeout: float) -> None:
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout

    def serve(self) -> None:
        server = self.server
        settings = server.settings
        reader = self.reader
        recv = self.sock.recv
        keepalive_timeout = settings.keepalive_timeout_s
        read_timeout = settings.read_timeout_s
        respond = self._respond if server.handle is None else self._respond_direct
        fresh = True
        pending, pending_at = b"", 0.0
        if server.fast:
            rest = self._serve_fast()
            if rest is None:
                return
            (pending, pending_at), fresh = rest, False
        while True:
            if pending:  # what the fast path read and left to tafe.http
                data, pending = pending, b""
                now = pending_at
            else:
                if reader.in_progress:
                    left = reader.arrival + read_timeout - _monotonic()
                    if left <= 0:
                        self._refuse(http.HttpError(408, "request not received in time"))
                        return
                    self._settimeout(left)
                elif fresh:
                    fresh = False  # its first request is read even when closing (see __init__)
                    # ... if it comes within the read timeout: a connection opened and left
                    # silent is not a keep-alive one, and must not hold a drain for long.
                    self._settimeout(min(keepalive_timeout, read_timeout))
                else:
                    self.idle = True
                    if server.closing:
                        return
                    self._settimeout(keepalive_timeout)
                try:
                    data = recv(_RECV)
                except TimeoutError:
                    if reader.in_progress:
                        self._refuse(http.HttpError(408, "request not received in time"))
                    return
                except OSError:
                    return
                if not data:
                    return
                now = _monotonic()
            self.idle = False
            requests = reader.feed(data, now)
            if requests and self.timeout < read_timeout:
                # The time left to read a request is no limit on sending its answer.
                self._settimeout(read_timeout)
            for request in requests:
                if not respond(request):
                    if reader.discarded or reader.in_progress or request is not requests[-1]:
                        self._linger()  # the client sent more than we will answer
                    return
                # Fair turns: a connection whose next request is already there would be
                # served again at once while others wait (p99 ~15x p50 under wrk). The
                # yield also pays for itself under load: by the time this connection
                # runs again its next request has often arrived, so the read below
                # finds it without a failed recv and a wait on the socket (measured:
                # less CPU per request than yielding only when the loop has not turned,
                # or never).
                gevent.sleep(0)
            if reader.error is not None:
                self._refuse(reader.error)
                return
            if reader.closed:
                return
            if reader.send_continue:
                reader.send_continue = False
                try:
                    self.sendall(http.CONTINUE)
                except OSError:
                    return

    def _serve_fast(self) -> tuple[bytes, float] | None:
        """Serve requests with the hot loop in C (``tafe._fastpath``) while they are
        simple: None once the connection is done, else what it read and left to
        ``tafe.http`` (bytes, and the monotonic time they began to arrive).

        The C side reads, parses, calls the app's ``handle`` and sends; this side waits
        for the socket (gevent), keeps the same timeouts as the general loop, answers
        ``handle``'s failures with a 500 and gives a request ``handle`` leaves (None) to
        the WSGI path. A connection yields after every answer, as in the general loop.
        """
        server = self.server
        settings = server.settings
        handle = server.handle
        assert handle is not None  # server.fast says so
        fast = _fastpath.Conn(
            self.sock.fileno(), handle, server.direct_base, server, settings.max_header_bytes, settings.max_body_bytes, server.outbox
        )
        try:
            return self._fast_loop(fast)
        finally:
            # Each step sends a held answer before anything else, so only a greenlet
            # killed while its answer waited in the outbox gets here with one: it goes
            # now, while the descriptor is still this connection's.
            fast.send_held()

    def _fast_loop(self, fast: _fastpath.Conn) -> tuple[bytes, float] | None:
        server = self.server
        settings = server.settings
        fd = self.sock.fileno()
        step = fast.step
        keepalive_timeout = settings.keepalive_timeout_s
        read_timeout = settings.read_timeout_s
        # The first request is read even when closing (see __init__), if it comes within
        # the read timeout: a connection opened and left silent is not a keep-alive one.
        first_timeout = min(keepalive_timeout, read_timeout)
        served = False
        sleep = gevent.sleep
        while True:
            try:
                code = step()
            except Exception:
                code = self._fast_failed(fast)
            if code == _fastpath.DONE:
                served = True
                sleep(0)  # fair turns, as in serve()
            elif code == _fastpath.WAIT:
                if fast.buffered:  # a request has begun: it must be whole in time
                    timeout = fast.arrival + read_timeout - _monotonic()
                    if timeout <= 0:
                        self._refuse(http.HttpError(408, "request not received in time"))
                        return None
                elif served:  # between requests: idle
                    self.idle = True
                    if server.closing:
                        return None
                    timeout = keepalive_timeout
                else:
                    timeout = first_timeout
                try:
                    wait_read(fd, timeout)
                except TimeoutError:
                    if fast.buffered:
                        self._refuse(http.HttpError(408, "request not received in time"))
                    return None
                except OSError:
                    return None
                self.idle = False
            elif code == _fastpath.GENERAL:
                arrival = fast.arrival  # before take() empties the buffer
                return fast.take(), arrival
            elif code == _fastpath.WSGI:
                arrival = fast.arrival
                requests = self.reader.feed(fast.take(fast.request_end), arrival)
                if len(requests) != 1 or self.reader.in_progress:  # the C reading is a subset of tafe.http's
                    log.error("%s: the fast path and tafe.http read a request differently", server.name)
                    return None
                self._settimeout(read_timeout)
                if not self._respond(requests[0]):
                    if fast.buffered:
                        self._linger()
                    return None
                served = True
                sleep(0)
            elif code == _fastpath.UNSENT:
                self._settimeout(read_timeout)
                try:
                    self.sock.sendall(fast.take_unsent())
                except OSError:
                    return None
                if not fast.keep_alive:
                    code = _fastpath.CLOSE
                else:
                    served = True
                    sleep(0)
            if code == _fastpath.CLOSE:
                if fast.buffered:
                    self._linger()  # the client sent more than we will answer
                return None
            if code == _fastpath.GONE:
                return None

    def _fast_failed(self, fast: _fastpath.Conn) -> int:
        """A 500 for a request whose ``handle`` raised in the fast path (DONE or CLOSE)."""
        server = self.server
        log.exception("%s: app failed on %s %r", server.name, fast.method, fast.target)
        keep_alive = fast.keep_alive and not server.says_close
        head, body = _internal_error(keep_alive, fast.http11)
        try:
            self.sendall(head if fast.method == "HEAD" else head + body)
        except OSError:
            return _fastpath.GONE
        return _fastpath.DONE if keep_alive else _fastpath.CLOSE

    def _refuse(self, error: http.HttpError) -> None:
        server = self.server
        server.count_refused(error.status)
        log.debug("%s: %d %s (from %s)", server.name, error.status, error.reason, self.base["REMOTE_ADDR"])
        try:
            self.sock.sendall(http.error_response(error.status, error.reason, _time()))
        except OSError:
            return
        self._linger()

    def _linger(self) -> None:
        """Close gently a connection whose client may still be sending (a refused body,
        requests pipelined after the last one served): closing with its bytes unread
        would send a reset that can destroy our answer before the client reads it. So
        stop writing, read and drop what comes for a bounded time, as Nginx does."""
        sock = self.sock
        try:
            sock.shutdown(socket.SHUT_WR)
            deadline = _monotonic() + _LINGER_S
            while (left := deadline - _monotonic()) > 0:
                sock.settimeout(min(left, 0.5))
                if not sock.recv(_RECV):
                    break
        except OSError:
            pass

    # --- WSGI -------------------------------------------------------------------------

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response called a second time without exc_info")
        self.status = status
        self.headers = headers
        return self.write

    def _head(self, body_length: int | None) -> bytes:
        if self.status is None:
            raise AssertionError("the app sent a body before calling start_response")
        server = self.server
        # Decided now, not at arrival: a request in flight when draining began
        # still tells its client to go elsewhere next time.
        keep_alive = self.keep_alive and not server.says_close
        head, framing, keep_alive = http.response_head(
            self.status, self.headers, body_length, keep_alive, self.http11, _time()
        )
        self.head_sent = True
        self.keep_alive = keep_alive
        self.remaining = framing
        return head

    def write(self, data: bytes) -> None:
        """Send part of a streamed body (the WSGI ``write`` callable and iterables)."""
        if not data:
            return
        head = b"" if self.head_sent else self._head(None)
        if self.is_head:
            if head:
                self.sendall(head)
            return
        remaining = self.remaining
        if remaining == http.CHUNKED:
            data = http.chunk(data)
        elif remaining >= 0:
            if len(data) > remaining:
                data = data[:remaining]
            self.remaining = remaining - len(data)
        self.bytes_out += len(data)
        self.sendall(head + data if head else data)

    def _finish_stream(self) -> None:
        if not self.head_sent:
            self.sendall(self._head(0))
        elif self.is_head:
            return
        elif self.remaining == http.CHUNKED:
            self.sendall(http.LAST_CHUNK)
        elif self.remaining > 0:
            self.keep_alive = False  # the app promised more than it sent

    def _send_whole(self, body: bytes) -> None:
        head = self._head(len(body))
        remaining = self.remaining
        if self.is_head or remaining == 0:
            self.sendall(head)
            return
        if remaining >= 0 and remaining != len(body):
            self.keep_alive = False  # the app's Content-Length is wrong: do not reuse
            body = body[:remaining]
        self.bytes_out = len(body)
        self.sendall(head + body)

    def _respond(self, request: http.Request) -> bool:
        """Run the app for one request and send its answer; False closes the connection."""
        server = self.server
        self.status = None
        self.head_sent = False
        self.bytes_out = 0
        self.http11 = request.http11
        self.is_head = request.method == "HEAD"
        self.keep_alive = request.keep_alive
        env: dict[str, Any] = {}
        try:
            try:
                env = http.wsgi_environ(request, self.base)
                env["tafe.request_id"] = env.get("HTTP_X_REQUEST_ID") or server.request_id()
                result = server.app(env, self.start_response)
                try:
                    if type(result) is list and not self.head_sent:
                        self._send_whole(result[0] if len(result) == 1 else b"".join(result))
                    else:
                        for data in result:
                            self.write(data)
                        self._finish_stream()
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
            except OSError:
                return False  # the client went away
            except Exception:
                log.exception(
                    "%s: app failed on %s %r (request id %s)",
                    server.name, request.method, request.target, env.get("tafe.request_id"),
                )
                if self.head_sent:
                    return False  # half a response is out: closing is the only honest end
                self.status = None
                self.headers = [("Content-Type", "text/plain; charset=utf-8")]
                self.start_response(_INTERNAL_ERROR, self.headers)
                try:
                    self._send_whole(_INTERNAL_ERROR_BODY)
                except OSError:
                    return False
            if server.settings.access_log:
                self._log_access(request, env)
            return self.keep_alive
        finally:
            if server.span_over is not None and server.span_over() and server.profiler is not None:  # a C call; rarely true
                server.profiler.finish(env, server.route_of)

    def _respond_direct(self, request: http.Request) -> bool:
        """``_respond`` through the app's ``handle``: its answer is one head and body, sent
        in one write. A request the handle leaves (None) goes to ``_respond``."""
        server = self.server
        env: dict[str, Any] = {}
        served = True
        try:
            _, path, _ = http.split_target(request.target)
            env = http.direct_environ(request, server.direct_base, path)
            # As in _head: decided after the app ran, not at arrival (see there).
            try:
                answer = server.handle(request.method, path, env)  # type: ignore[misc]  # set when this runs
                if answer is None:
                    served = False
                    return self._respond(request)
                status, headers, body = answer
                keep_alive = request.keep_alive and not server.says_close
                head, has_body = http.direct_head(status, headers, len(body), keep_alive, request.http11, _time())
            except Exception:
                log.exception("%s: app failed on %s %r", server.name, request.method, request.target)
                keep_alive = request.keep_alive and not server.says_close
                (head, body), status, has_body = _internal_error(keep_alive, request.http11), _INTERNAL_ERROR, True
            self.status = status
            self.bytes_out = len(body) if has_body and request.method != "HEAD" else 0
            try:
                self.sendall(head + body if self.bytes_out else head)
            except OSError:
                return False  # the client went away
            if server.settings.access_log:
                env["tafe.request_id"] = env.get("HTTP_X_REQUEST_ID") or server.request_id()
                self._log_access(request, env)
            return keep_alive
        finally:
            if served and server.span_over is not None and server.span_over() and server.profiler is not None:
                server.profiler.finish(env, server.route_of)

    def _log_access(self, request: http.Request, env: dict[str, Any]) -> None:
        duration_ms = round((_monotonic() - request.arrival) * 1000.0, 3)
        status = (self.status or "")[:3]
        request_id = env.get("tafe.request_id", "")
        remote = self.base["REMOTE_ADDR"]
        # JSON mode: the same line as msg, and every part as its own key (tafe.logs).
        fields = {
            "request_id": request_id, "remote": remote, "method": request.method,
            "path": env.get("PATH_INFO", ""), "status": int(status or 0), "bytes": self.bytes_out,
            "duration_ms": duration_ms, "server": self.server.name,
        } if self.server.settings.log_json else None
        access_log.info(
            '%s "%s %s" %s %d %.3fms %s', remote, request.method, request.target.decode("latin-1"),
            status, self.bytes_out, duration_ms, request_id, extra={"fields": fields},
        )
