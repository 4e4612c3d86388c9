"""TAFE's HTTP server's life cycle over real sockets: processes sharing a listener, a full
connection pool, port 0, and SIGTERM draining (``tests/raw_http.py`` starts the servers)."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest
from raw_http import Reader, ServerProcess, exchange


def test_processes_sharing_an_inherited_listener_all_keep_serving():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    workers = [ServerProcess(listener), ServerProcess(listener)]
    try:
        kept = []
        for i in range(12):
            sock = workers[0].connect()
            kept.append((sock, Reader(sock)))
            sock.sendall(b"GET /w%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            assert kept[-1][1].response().json()["path"] == f"/w{i}"
            for old, reader in kept:  # no process is stuck in accept()
                old.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                assert reader.response().body == b"pong"
        for sock, _ in kept:
            sock.close()
    finally:
        listener.close()
        for worker in workers:
            worker.stop()


def test_full_pool_holds_new_connections_until_idle_ones_time_out():
    proc = ServerProcess(TAFE_MAX_CONNECTIONS="2", TAFE_KEEPALIVE_TIMEOUT_S="2")
    try:
        held = []
        for _ in range(2):
            sock = proc.connect()
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(sock).response().body == b"pong"
            held.append(sock)
        with proc.connect() as third:
            third.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            third.settimeout(0.3)
            with pytest.raises(TimeoutError):
                third.recv(1)  # queued in the backlog: the pool is full
            third.settimeout(10)
            assert Reader(third).response().body == b"pong"  # once the idle ones are closed
        for sock in held:
            sock.settimeout(5)
            assert Reader(sock).closed()
            sock.close()
    finally:
        proc.stop()


def test_port_0_binds_a_real_port_and_the_server_reports_it():
    from tafe import server, settings
    from tafe.lifecycle import Lifecycle

    listener = server.bind("127.0.0.1", 0)
    try:
        srv = server.Server(listener, lambda env, start: [], settings.Settings(), Lifecycle())
        assert srv.address == listener.getsockname() and srv.address[1] > 0
    finally:
        listener.close()


def test_sigterm_drains_in_flight_then_refuses_and_exits_0():
    proc = ServerProcess(TAFE_DRAIN_GRACE_S="2.0", TAFE_ACCESS_LOG="1", TAFE_LOG_JSON="1")
    try:
        with proc.connect() as busy, proc.connect() as idle:
            busy.sendall(b"GET /slow?3 HTTP/1.1\r\nHost: x\r\n\r\n")
            idle.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(idle).response().body == b"pong"
            time.sleep(0.2)  # the slow request is in the app now
            proc.proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            # During the grace new connections are still accepted, /ping says 503
            # (as soon as the signal has been handled).
            while True:
                responses, closed = exchange(proc, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                if responses[0].status == 503 or time.monotonic() - signalled > 1.8:
                    break
                time.sleep(0.02)
            assert responses[0].status == 503 and closed
            # Past the grace new connections are refused (polled: a loaded machine may
            # handle the signal late, and the grace counts from then).
            refused_by = time.monotonic() + 10
            while time.monotonic() < refused_by:
                try:
                    proc.connect(timeout=1).close()
                except OSError:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("new connections still accepted long after the grace")
            resp = Reader(busy).response()
            assert resp.status == 200 and resp.body == b"slow done"
            assert resp.headers["connection"] == "close"
            idle.settimeout(5)
            assert Reader(idle).closed()
        assert proc.proc.wait(10) == 0
    finally:
        err = proc.stop()
    assert "drained" in err
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [entry for entry in entries if entry["logger"] == "tafe.access"]
    slow = [entry for entry in access if entry["path"] == "/slow"]
    assert len(slow) == 1 and slow[0]["status"] == 200 and slow[0]["bytes"] == len(b"slow done")
    assert slow[0]["method"] == "GET" and slow[0]["request_id"] and slow[0]["duration_ms"] >= 2500
