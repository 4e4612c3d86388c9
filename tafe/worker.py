"""``tafe worker``: one pre-forked worker, started by the master (``tafe.master``).

It is a fresh interpreter, monkey-patched by ``tafe.cli`` before this module is
imported; it serves on the listening sockets inherited from the master (passed as
file descriptors) with exactly what ``tafe serve`` runs in-process, and writes one
byte to the readiness pipe when its apps are built and it is about to accept. A
configuration mistake found while starting (a bad campaigns, model or store file) is
written to that pipe instead, ``!`` and one line, for the master to report once,
however many workers hit it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket

from tafe import logs, metrics
from tafe import settings as settings_mod

log = logging.getLogger("tafe.worker")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--listen-fd", type=int, required=True, help="inherited listening socket for bids")
    parser.add_argument("--admin-fd", type=int, default=-1, help="inherited listening socket for the admin app")
    parser.add_argument("--ready-fd", type=int, default=-1, help="pipe to write one byte to once ready")
    parser.add_argument("--slot", type=int, default=0, help="worker number (CPU affinity, logs)")
    parser.add_argument("--settings", required=True, help="the master's settings, as JSON")
    parser.add_argument("--restart-cause", default="", help="why the previous worker in this slot died")


def pin_cpu(slot: int) -> None:
    """Worker ``slot`` on one CPU of those this process may use (round robin)."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[slot % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    log.info("worker %d pinned to CPU %d", slot, cpu)


def run(args: argparse.Namespace) -> int:
    from tafe import serve

    # environ={}: the master already resolved file, environment and command line.
    overrides = json.loads(args.settings)
    overrides["notice_keys"] = os.environ.get("TAFE_NOTICE_KEYS", "")  # secrets stay off the command line
    settings = settings_mod.load(environ={}, overrides=overrides)
    logs.configure(settings)
    if settings.cpu_affinity:
        pin_cpu(args.slot)
    if args.restart_cause:
        metrics.worker_restarts(None).labels(cause=args.restart_cause).inc()
    listener = socket.socket(fileno=args.listen_fd)
    admin = socket.socket(fileno=args.admin_fd) if args.admin_fd >= 0 else None
    if admin is None:
        settings = settings.with_overrides(admin_port=-1)

    def tell(message: bytes) -> None:
        if args.ready_fd >= 0:
            os.write(args.ready_fd, message[:4096])  # at most PIPE_BUF: one atomic write
            os.close(args.ready_fd)
            args.ready_fd = -1

    try:
        return serve.serve_in_process(settings, listener, admin, on_ready=lambda: tell(b"1"))
    except settings_mod.SettingsError as exc:
        if args.ready_fd < 0:  # not started by a master: say it here
            raise
        tell(b"!" + str(exc).encode())
        return 2
