"""The gevent shell around ``tafe.http``: listeners, greenlets, draining.

One greenlet per connection (from a bounded pool, so a full worker stops accepting
instead of drowning), serving any WSGI app; each connection is a ``tafe.connection.Connection``
(its read loops, its timeouts, its answers). The HTTP rules live in ``tafe.http``; the
hot loop for the usual request in ``tafe._fastpath``. An app that also offers ``handle``
(TAFE's public app, for its bid route) is called through it instead where it accepts
the request: no WSGI environ, no ``start_response``; the same limits, keep-alive,
draining, access log and profiler attribution apply. It assumes the process has
already been monkey-patched (``tafe.cli`` does it first thing).

On drain, answers say ``Connection: close``, the listener closes, idle connections are
closed once no request is in flight.

Why not ``gevent.pywsgi``: it writes headers and body separately (a 40 ms
Nagle/delayed-ACK stall per keep-alive request without ``TCP_NODELAY``), parses in
Python, and serves greenlets unfairly (p99 ~5x p50). Here a response is one ``sendall``,
parsing is llhttp (or C for the usual request), and a connection yields to the others
between pipelined requests.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from tafe import _fastpath
from tafe.connection import Connection
from tafe.lifecycle import Lifecycle
from tafe.listeners import bind as bind  # servers listen on tafe.server.bind(host, port)
from tafe.settings import Settings

if TYPE_CHECKING:
    from tafe.metrics import Metrics
    from tafe.profiler import Profiler

log = logging.getLogger("tafe.server")

__all__ = ["bind", "Server", "run"]

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# An app's fast path beside its WSGI ``__call__``: (method, path, environ of
# ``http.direct_environ``) -> (status, headers, body), or None for a request it leaves
# to its WSGI side. TAFE's public app has one (``tafe.handlers.PublicApp``).
Handle = Callable[[str, str, dict[str, Any]], "tuple[str, list[tuple[str, str]], bytes] | None"]

_monotonic = time.monotonic

# tafe_bad_requests_total{reason} of the requests refused before any app saw them.
_REFUSAL_REASONS = {400: "malformed_http", 408: "slow_client", 413: "too_large", 431: "head_too_large", 501: "unknown_transfer_coding"}

class Server:
    """Serves one WSGI app on one already-listening socket (bound here or inherited)."""

    def __init__(
        self,
        listener: socket.socket,
        app: WSGIApp,
        settings: Settings,
        lifecycle: Lifecycle,
        *,
        name: str = "public",
        metrics: Metrics | None = None,
        profiler: Profiler | None = None,
    ) -> None:
        self.app = app
        self.settings = settings
        self.lifecycle = lifecycle
        self.name = name
        self.metrics = metrics  # counts the requests refused here (tafe_bad_requests_total)
        # The greenlet profiler, attributing spans to requests without its middleware:
        # each _respond frame serves one request (found on a blocked greenlet's stack).
        self.profiler = profiler
        self.span_over: Callable[[], bool] | None = None
        if profiler is not None:
            from tafe.profiler.profiler import default_route

            self.route_of = default_route
            profiler.serves_requests(Connection._respond.__code__, "env", default_route)
            profiler.serves_requests(Connection._respond_direct.__code__, "env", default_route)
            self.span_over = profiler.span_over
        # The app's fast path, if it has one: no WSGI environ, no start_response, a head
        # from cached bytes (tafe.http.direct_head). Any other app is served as WSGI.
        self.handle: Handle | None = getattr(app, "handle", None)
        # Its hot loop in C (tafe._fastpath) serves the usual request on each connection
        # until one needs tafe.http; not with the access log or the profiler, which read
        # each request's Python frames and fields.
        self.fast = self.handle is not None and not settings.access_log and profiler is None
        # Its answers on busy connections leave together, about send_batch_us late at
        # most: a wake-up of the client (or Nginx) per batch, not per answer (the rules
        # are in tafe/_fastpath.c).
        self.outbox = _fastpath.Outbox(settings.send_batch_us / 1e6) if self.fast and settings.send_batch_us else None
        if self.outbox is not None and metrics is not None:
            outbox = self.outbox
            metrics.updates.total(metrics.answers_held, lambda: outbox.answers)
            metrics.updates.total(metrics.answer_batches, lambda: outbox.batches)
        self.closing = False
        self.retiring = False  # replaced (SIGUSR2): answers close their connections, /ping stays 200
        self.connections: set[Connection] = set()
        # Non-blocking even if inherited from a process that never imported gevent:
        # workers sharing a listener are all woken for one connection, and a blocking
        # accept() in the losers would freeze their whole event loop.
        listener.setblocking(False)
        self._listener = listener
        self._tcp = listener.family in (socket.AF_INET, socket.AF_INET6)
        sockname = listener.getsockname()
        if isinstance(sockname, tuple):
            self.address: tuple[str, int] = (sockname[0], sockname[1])
        else:
            self.address = (str(sockname), 0)
        self._pool = Pool(settings.max_connections)
        self._stream = StreamServer(listener, self._handle, spawn=self._pool)
        if settings.workers > 1:
            self._stream.max_accept = 1  # share new connections fairly between workers
        self._ids = itertools.count(1)
        self._id_prefix = ""
        # A unix socket (behind Nginx) has no host or port, which CGI still wants: this
        # machine, and the scheme's default port.
        server_name, server_port = self.address if self._tcp else ("localhost", 80)
        self.base_environ = {
            "SERVER_NAME": server_name,
            "SERVER_PORT": str(server_port),
            "SCRIPT_NAME": "",
            "SERVER_SOFTWARE": "tafe",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        self.direct_base = {k: self.base_environ[k] for k in ("SERVER_NAME", "SERVER_PORT", "wsgi.url_scheme")}

    def __repr__(self) -> str:
        return f"<Server {self.name} {self.url}>"

    @property
    def url(self) -> str:
        """Where it listens, for logs: http://host:port, or unix:path (behind Nginx)."""
        host, port = self.address
        return f"http://{host}:{port}" if self._tcp else f"unix:{host}"

    def start(self) -> None:
        """Begin accepting in the background."""
        # Chosen here, after any fork, so that workers do not share request ids.
        self._id_prefix = f"{os.getpid():x}-{os.urandom(3).hex()}-"
        self._stream.start()

    def stop_accepting(self) -> None:
        """Close the listener; in-flight requests finish, then their connections close."""
        self.closing = True
        if not self._stream.closed:
            self._stream.close()

    @property
    def says_close(self) -> bool:
        """Whether answers now say ``Connection: close``: from a drain (SIGTERM), a
        replacement (SIGUSR2) or the listener closing on. Read after the app ran, not at
        arrival, so a request in flight when it began still tells its client."""
        return self.closing or self.retiring or self.lifecycle.draining

    def busy(self) -> bool:
        # A connection accepted just before the listener closed may have its greenlet
        # spawned but not yet started (so not in self.connections): it counts as busy,
        # or the process could exit under it and reset the client.
        return len(self._pool) > len(self.connections) or any(not conn.idle for conn in self.connections)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or ``timeout`` (False).

        Connections idle at that point are closed (a client that sends on them now
        sees the close, as with any keep-alive timeout).
        """
        deadline = _monotonic() + timeout
        while self.busy():
            if _monotonic() >= deadline:
                return False
            gevent.sleep(0.02)
        self.close_connections(idle_only=True)
        return True

    def close_connections(self, idle_only: bool = False) -> None:
        if self.outbox is not None:
            self.outbox.flush()  # answers already made reach their clients before the shutdown
        for conn in list(self.connections):
            if conn.idle or not idle_only:
                conn.shutdown()

    def request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    def count_refused(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.bad_requests.labels(reason=_REFUSAL_REASONS.get(status, f"http_{status}")).inc()

    def _handle(self, sock: socket.socket, addr: Any) -> None:
        conn = Connection(self, sock, addr)
        self.connections.add(conn)
        try:
            conn.serve()
        except Exception:  # never let one connection take the worker's loop down
            log.exception("%s: connection from %s failed", self.name, addr)
        finally:
            self.connections.discard(conn)
            try:
                sock.close()
            except OSError:
                pass


def run(
    servers: list[Server], settings: Settings, lifecycle: Lifecycle, on_started: Callable[[], None] | None = None
) -> int:
    """Serve until SIGTERM/SIGINT, then drain: 503 on /ping, stop accepting, finish, exit 0.

    SIGUSR2 drains a worker being replaced while the machine stays in service (the
    pre-fork master's rolling restart): the same drain, but /ping stays 200 so the
    balancer keeps the machine. In both, answers say ``Connection: close`` from the
    signal on, and idle keep-alive connections get the grace to be closed by their
    client (Nginx's upstream keep-alive timeout is shorter) before the rest are closed.
    A second signal during the grace period cuts the grace short.
    """
    stop = Event()
    received: list[int] = []

    def on_signal(sig: int) -> None:
        received.append(sig)
        stop.set()

    handlers = [gevent.signal_handler(sig, on_signal, sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)]
    try:
        for server in servers:
            server.start()
        if on_started is not None:  # signal handlers are in place: safe to announce readiness
            on_started()
        stop.wait()
        if received[0] == signal.SIGUSR2:
            log.info("replaced: answers close their connections; refusing new ones in %.1fs", settings.drain_grace_s)
            for server in servers:
                server.retiring = True
        else:
            log.info("draining: /ping answers 503; refusing new connections in %.1fs", settings.drain_grace_s)
            lifecycle.start_draining()
        stop.clear()
        stop.wait(settings.drain_grace_s)
        for server in servers:
            server.stop_accepting()
        deadline = _monotonic() + settings.drain_timeout_s
        drained = all([server.wait_idle(max(0.0, deadline - _monotonic())) for server in servers])
        if not drained:
            log.warning("drain timeout: closing connections with requests still in flight")
        for server in servers:
            server.close_connections()
        log.info("drained; exiting")
        return 0
    finally:
        for handler in handlers:
            handler.cancel()
