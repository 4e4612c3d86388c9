"""A foreign gevent WSGI app with one blocking pattern per route.

Run as a real server process by the tests: ``python blocking_app.py THRESHOLD_MS SAMPLE
[SERVER]``, SERVER ``pywsgi`` (stock gevent.pywsgi with the profiler's middleware, the
default) or ``tafe`` (TAFE's own server attributing spans itself, no middleware); prints
``LISTENING <port>`` once ready. Each blocking route holds the loop ~25 ms on the
line marked ``# CULPRIT <route>``; the tests read those markers for the expected line.
"""

# ruff: noqa: E402, E701
from gevent import monkey

monkey.patch_all()

import hashlib
import json
import os
import signal
import socket
import sys
import tempfile
import zlib
from time import perf_counter

import gevent
import gevent.event
from gevent.monkey import get_original
from gevent.pywsgi import WSGIServer

from tafe import profiler

BLOCK_S = 0.025
blocking_sleep = get_original("time", "sleep")
BlockingSocket = get_original("socket", "socket")
start_thread = get_original("_thread", "start_new_thread")
BUF = os.urandom(1 << 18)
# Nameless (unlinked at once): nothing is left in the temporary directory, however the
# process ends (the tests stop it with SIGTERM or SIGKILL, which skip Python's clean-up).
BIG_FILE = tempfile.TemporaryFile(prefix="tafe-profiler-")
BIG_FILE.write(os.urandom(8 << 20))
BIG_FILE.flush()


def slow_server() -> tuple[str, int]:
    """A real-thread server that answers one byte 25 ms after each connection."""
    listener = BlockingSocket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            blocking_sleep(BLOCK_S)
            conn.sendall(b"x")
            conn.close()

    start_thread(serve, ())
    return listener.getsockname()


SLOW = slow_server()


def sleep_route() -> None:
    blocking_sleep(BLOCK_S)  # CULPRIT /sleep


def cpu_route() -> int:
    n, end = 0, perf_counter() + BLOCK_S
    while perf_counter() < end: n += 1  # CULPRIT /cpu
    return n


def file_route() -> None:
    buf = bytearray(1 << 20)
    with os.fdopen(os.dup(BIG_FILE.fileno()), "rb", buffering=0) as f:  # a file opened per request
        end = perf_counter() + BLOCK_S
        while perf_counter() < end: f.seek(0) or f.readinto(buf)  # CULPRIT /file


def socket_route() -> None:
    with BlockingSocket() as s:
        s.connect(SLOW)
        s.recv(1)  # CULPRIT /socket


def zlib_route() -> None:
    end = perf_counter() + BLOCK_S
    while perf_counter() < end: zlib.compress(BUF, 6)  # CULPRIT /zlib


def hash_route() -> None:
    end = perf_counter() + BLOCK_S
    while perf_counter() < end: hashlib.sha256(BUF).digest()  # CULPRIT /hash


def subprocess_route() -> None:
    os.system("sleep 0.025")  # CULPRIT /subprocess


def coop_route() -> None:
    """The same waits done cooperatively: nothing here should be reported."""
    gevent.sleep(BLOCK_S)
    with socket.socket() as s:
        s.connect(SLOW)
        s.recv(1)
    json.dumps({"n": list(range(100))})


ROUTES = {
    "/sleep": sleep_route,
    "/cpu": cpu_route,
    "/file": file_route,
    "/socket": socket_route,
    "/zlib": zlib_route,
    "/hash": hash_route,
    "/subprocess": subprocess_route,
    "/coop": coop_route,
}


def make_app(prof: profiler.Profiler, wrap: bool = True):
    debug = profiler.debug_app(prof)

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path.startswith("/debug/blocking"):
            return debug(environ, start_response)
        handler = ROUTES.get(path)
        if handler is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no such route\n"]
        handler()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"ok\n"]

    return profiler.middleware(app, prof) if wrap else app


def main() -> None:
    threshold_ms = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    sample = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    prof = profiler.install(threshold_ms=threshold_ms, sample=sample, log=False)
    if len(sys.argv) > 3 and sys.argv[3] == "tafe":
        from tafe import server as tafe_server
        from tafe.lifecycle import Lifecycle
        from tafe.settings import Settings

        srv = tafe_server.Server(tafe_server.bind("127.0.0.1", 0), make_app(prof, wrap=False), Settings(), Lifecycle(), profiler=prof)
        srv.start()
        stop = gevent.event.Event()
        gevent.signal_handler(signal.SIGTERM, stop.set)
        print("LISTENING", srv.address[1], flush=True)
        stop.wait()
        prof.uninstall()
        return
    server = WSGIServer(("127.0.0.1", 0), make_app(prof), log=None)
    server.start()
    gevent.signal_handler(signal.SIGTERM, server.close)
    print("LISTENING", server.server_port, flush=True)
    server.serve_forever()
    prof.uninstall()


if __name__ == "__main__":
    main()
