"""An open-loop HTTP load generator: requests leave on a fixed schedule, whatever the server does.

A closed-loop client (wrk, ab, locust without pacing) sends the next request only when
the previous answer is back, so a server that stalls also stalls its load and hides its
tail ("coordinated omission"). Here a dispatcher releases request *i* at ``t0 + i/rate``
to a pool of keep-alive connections, and latency is measured from that intended send
time: a request that had to wait for a free connection, or for the server to accept,
carries the wait in its latency. This is what wrk2 does; Debian does not ship wrk2.

Runs under gevent (one greenlet per connection), responses parsed by httptools (llhttp).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gevent  # noqa: E402
import httptools  # noqa: E402
from gevent.queue import Queue  # noqa: E402


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)  # requests sent after the warm-up
    due_s: list[float] = field(default_factory=list)  # their intended send times, from the start of measuring
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0
    duration_s: float = 0.0
    max_dispatch_lag_ms: float = 0.0  # how late the client itself released a request

    @property
    def achieved_rps(self) -> float:
        return len(self.latencies_ms) / self.duration_s if self.duration_s else 0.0


class _Reader:
    """Collects one HTTP response at a time from a keep-alive stream."""

    def __init__(self) -> None:
        self.done = False
        self.keep_alive = True
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.done = True
        self.keep_alive = self.parser.should_keep_alive()

    def read(self, sock: socket.socket) -> int:
        self.done = False
        while not self.done:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.parser.feed_data(data)
        return self.parser.get_status_code()


def run(
    port: int,
    request: bytes,
    rate: float,
    duration_s: float,
    warmup_s: float = 2.0,
    connections: int = 64,
    timeout_s: float = 10.0,
    host: str = "127.0.0.1",
) -> Result:
    """Offer ``rate`` requests/s for ``warmup_s + duration_s``; keep the latencies after the warm-up."""
    result = Result()
    work: Queue = Queue()
    t0 = time.perf_counter() + 0.1
    measure_from = t0 + warmup_s
    total = int(rate * (warmup_s + duration_s))

    def dispatch() -> None:
        i = 0
        while i < total:
            now = time.perf_counter()
            due = t0 + i / rate
            if due > now:
                gevent.sleep(due - now)
                continue
            while i < total and t0 + i / rate <= now:  # release everything overdue at once
                result.max_dispatch_lag_ms = max(result.max_dispatch_lag_ms, (now - (t0 + i / rate)) * 1000)
                work.put(t0 + i / rate)
                i += 1
        for _ in range(connections):
            work.put(None)

    def connect() -> tuple[socket.socket, _Reader]:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, _Reader()

    def worker() -> None:
        sock = reader = None
        while True:
            intended = work.get()
            if intended is None:
                break
            try:
                if sock is None:
                    sock, reader = connect()
                sock.sendall(request)
                status = reader.read(sock)
                if not reader.keep_alive:
                    sock.close()
                    sock = None
            except (OSError, httptools.HttpParserError) as exc:
                status = 0
                name = type(exc).__name__
                result.errors[name] = result.errors.get(name, 0) + 1
                if sock is not None:
                    sock.close()
                sock = None
            done = time.perf_counter()
            result.sent += 1
            if intended >= measure_from:
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status:
                    result.latencies_ms.append((done - intended) * 1000.0)
                    result.due_s.append(intended - measure_from)
        if sock is not None:
            sock.close()

    workers = [gevent.spawn(worker) for _ in range(connections)]
    dispatcher = gevent.spawn(dispatch)
    gevent.joinall([dispatcher, *workers], timeout=warmup_s + duration_s + timeout_s + 30)
    gevent.killall([dispatcher, *workers], block=False)
    result.duration_s = duration_s
    return result


def http_post(path: str, body: bytes, host: str = "127.0.0.1", content_type: str = "application/json") -> bytes:
    """The raw bytes of one keep-alive POST request."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nx-openrtb-version: 2.5\r\n\r\n"
    )
    return head.encode() + body
