"""An open-loop HTTP load generator: requests leave on a schedule, whatever the server does.

A closed-loop client (wrk, ab, locust without pacing) sends the next request only when
the previous answer is back, so a server that stalls also stalls its load and hides its
tail ("coordinated omission"). Here a dispatcher releases request *i* at its intended
time ``t0 + schedule[i]`` to a pool of keep-alive connections, and latency is measured
from that intended time: a request that had to wait for a free connection, or for the
server to accept, carries the wait in its latency. This is what wrk2 does; Debian does
not ship wrk2.

Two schedules (``schedule``): ``poisson`` (exponential gaps from a seeded generator: an
exchange's traffic is the sum of many independent users, so arrivals bunch up at
random; the same seed gives every server the same sequence) and ``fixed`` (one request
every ``1/rate`` s, the gentlest load at a given rate). Request *i* sends
``requests[i % len(requests)]``, so what each request carries (e.g. its user id) is the
same for every server too.

Runs under gevent (one greenlet per connection), responses parsed by httptools (llhttp).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import random  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gevent  # noqa: E402
import httptools  # noqa: E402
from gevent.queue import Queue  # noqa: E402

ARRIVALS = ("poisson", "fixed")


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)  # answered requests sent after the warm-up
    indices: list[int] = field(default_factory=list)  # their positions in the sequence (which request they sent)
    statuses: dict[int, int] = field(default_factory=dict)  # measured requests by status, 0 = no answer
    errors: dict[str, int] = field(default_factory=dict)  # why measured requests got no answer
    offered: int = 0  # requests due after the warm-up (answered or not)
    sent: int = 0
    duration_s: float = 0.0
    max_dispatch_lag_ms: float = 0.0  # how late the client itself released a request

    @property
    def achieved_rps(self) -> float:
        return len(self.latencies_ms) / self.duration_s if self.duration_s else 0.0


def schedule(rate: float, seconds: float, arrivals: str = "poisson", seed: int = 0) -> list[float]:
    """Intended send times (s from the start) of the requests offered at ``rate`` for ``seconds``."""
    if arrivals == "fixed":
        return [i / rate for i in range(int(rate * seconds))]
    if arrivals != "poisson":
        raise ValueError(f"arrivals must be one of {ARRIVALS}, not {arrivals!r}")
    rng = random.Random(seed)
    times, t = [], rng.expovariate(rate)
    while t < seconds:
        times.append(t)
        t += rng.expovariate(rate)
    return times


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
    requests: bytes | Sequence[bytes],
    rate: float,
    duration_s: float,
    warmup_s: float = 2.0,
    connections: int = 64,
    timeout_s: float = 5.0,
    host: str = "127.0.0.1",
    arrivals: str = "poisson",
    seed: int = 0,
) -> Result:
    """Offer ``rate`` requests/s for ``warmup_s + duration_s``; keep the latencies after the warm-up.

    Answers are awaited until ``timeout_s`` after the last request was due, no longer: a
    server far behind costs failures, not an unbounded drain.
    """
    if isinstance(requests, bytes):
        requests = [requests]
    result = Result()
    work: Queue = Queue()
    times = schedule(rate, warmup_s + duration_s, arrivals, seed)
    t0 = time.perf_counter() + 0.1
    measure_from = t0 + warmup_s
    result.offered = sum(1 for t in times if t >= warmup_s)

    def dispatch() -> None:
        i = 0
        while i < len(times):
            now = time.perf_counter()
            if t0 + times[i] > now:
                gevent.sleep(t0 + times[i] - now)
                continue
            while i < len(times) and t0 + times[i] <= now:  # release everything overdue at once
                result.max_dispatch_lag_ms = max(result.max_dispatch_lag_ms, (now - t0 - times[i]) * 1000)
                work.put((i, t0 + times[i]))
                i += 1
        for _ in range(connections):
            work.put(None)

    def connect() -> tuple[socket.socket, _Reader]:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, _Reader()

    def count(errors: dict[str, int], name: str) -> None:
        errors[name] = errors.get(name, 0) + 1

    def worker() -> None:
        sock = reader = None
        while True:
            item = work.get()
            if item is None:
                break
            i, intended = item
            error = ""
            try:
                if sock is None:
                    sock, reader = connect()
                sock.sendall(requests[i % len(requests)])
                status = reader.read(sock)
                if not reader.keep_alive:
                    sock.close()
                    sock = None
            except (OSError, httptools.HttpParserError) as exc:
                status, error = 0, type(exc).__name__
                if sock is not None:
                    sock.close()
                sock = None
            done = time.perf_counter()
            result.sent += 1
            if intended >= measure_from:
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if error:
                    count(result.errors, error)
                if status:
                    result.latencies_ms.append((done - intended) * 1000.0)
                    result.indices.append(i)
        if sock is not None:
            sock.close()

    workers = [gevent.spawn(worker) for _ in range(connections)]
    dispatcher = gevent.spawn(dispatch)
    gevent.joinall([dispatcher, *workers], timeout=max(0.0, t0 + times[-1] + timeout_s - time.perf_counter()) if times else 0)
    gevent.killall([dispatcher, *workers], block=False)
    while not work.empty():  # a server so far behind that some requests never left: failures, not silence
        item = work.get()
        if item is not None and item[1] >= measure_from:
            result.statuses[0] = result.statuses.get(0, 0) + 1
            count(result.errors, "never sent")
    result.duration_s = duration_s
    return result


def http_post(path: str, body: bytes, host: str = "127.0.0.1", content_type: str = "application/json") -> bytes:
    """The raw bytes of one keep-alive POST request."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nx-openrtb-version: 2.5\r\n\r\n"
    )
    return head.encode() + body
