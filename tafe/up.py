"""``tafe up``: one whole machine in the foreground: Nginx, the master and its workers.

Nginx (the Debian package's binary, run as a child with its own prefix under the run
directory) listens on the public ``--port`` and proxies to the workers, which share a
unix socket held by the master (``workers.sock`` in the run directory: no TCP/IP stack
on the hop); the admin listener (``/metrics``, ``/debug/*``) is the workers' own, on
``--admin-port``, never behind Nginx.

Signals, in an order that drops nothing:

- SIGTERM / Ctrl-C: the workers start draining (``/ping`` 503 through Nginx, so the
  load balancer rotates the machine out) while Nginx keeps proxying for the grace,
  every answer saying "Connection: close" (``Nginx.drain``) so that no client still
  holds a kept-alive connection when Nginx goes; then Nginx quits gracefully (stops accepting, finishes what it has); the workers,
  whose grace is longer by the time Nginx needs for that, stop accepting only after,
  finish, and exit. Nothing is left running. Ctrl-C twice kills everything at once.
- SIGHUP: settings re-read, rolling restart of the workers, Nginx reloads a re-rendered
  config (its own graceful worker swap).

Without an nginx binary: as root on Debian it is installed from Debian's packages;
otherwise TAFE says how to install it and serves on the public port without Nginx.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path

from tafe import logs, nginx
from tafe.children import describe_exit
from tafe.core import load_campaigns
from tafe.exchanges import load as load_exchanges
from tafe.listeners import UNIX_PATH_MAX, bind
from tafe.master import Master, run_directory
from tafe.settings import Settings, demo_curl

log = logging.getLogger("tafe.up")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from tafe.cli import add_settings_options

    parser.epilog = (
        "Nginx serves --host/--port and proxies to the workers on a unix socket in the run directory; the admin listener is "
        "--admin-host/--admin-port. SIGTERM or Ctrl-C drains and stops everything; SIGHUP re-reads the "
        "settings, rolls the workers one by one and reloads Nginx."
    )
    add_settings_options(parser, command)


def run(args: argparse.Namespace) -> int:
    from tafe.cli import settings_from_args

    settings = settings_from_args(args)
    logs.configure(settings)
    # Refused here in one line, before Nginx starts or a worker is forked.
    load_campaigns(settings.campaigns, seat=settings.seat, currency=settings.currency)
    load_exchanges(settings)
    binary = nginx.ensure_binary(settings)
    if binary is None:
        log.warning("serving without Nginx: the workers listen on the public port themselves")
        return Master(settings, reload=lambda: settings_from_args(args)).serve()
    port = free_port(settings.host, settings.port)  # a taken port is one clear line, not Nginx's retries

    def pinned() -> Settings:  # a reload keeps the port picked for --port 0
        fresh = settings_from_args(args)
        return fresh.with_overrides(port=port) if fresh.port == 0 else fresh

    append_only_output()
    return Node(pinned(), binary, pinned).run()


def append_only_output() -> None:
    """Set O_APPEND on stdout's and stderr's open files, shared with every child.

    Nginx writes its access log through its own open of /dev/stdout (its own file
    offset, at the end), TAFE's processes through the inherited one: to a file the
    shell opened without O_APPEND (``tafe up > log``) each would write over the
    other's lines. With O_APPEND every write lands at the end of the file.
    """
    for fd in (1, 2):
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        except OSError:  # closed, or a file that refuses the flag: nothing to protect
            pass


def free_port(host: str, port: int = 0) -> int:
    """``port`` if it is free now, or a free one for 0 (Nginx cannot listen on port 0
    itself); raises ``ListenError`` (a ``SettingsError``) naming it otherwise. Another process could take it
    before Nginx binds it: ``Nginx.start`` then fails, as it checks that Nginx holds the port."""
    with bind(host, port) as sock:
        bound: int = sock.getsockname()[1]
        return bound


def nginx_budget_s(settings: Settings) -> float:
    """How long a quitting Nginx may still need the workers: the longest bid, plus a second."""
    return settings.max_tmax_ms / 1000.0 + 1.0


class Node:
    """Nginx in front of a ``Master``, driven by the master's event loop."""

    def __init__(self, settings: Settings, binary: str, reload: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._own_run_dir = not settings.run_dir
        self.run_dir = run_directory(settings.run_dir, prefix="tafe-up-")
        if os.geteuid() == 0:
            os.chmod(self.run_dir, 0o755)  # Nginx's workers run as "nobody" under root
        self._tcp_why = ""
        try:
            self.master = Master(
                settings, reload=reload, listen=self._workers_listen(), worker_overrides=self._overrides(settings),
                run_dir=self.run_dir,
            )  # fmt: skip
        except BaseException:  # a start-up mistake leaves no run directory behind
            self._remove_run_dir()
            raise
        self.nginx = nginx.Nginx(binary, self.run_dir / "nginx", batch=self.settings.nginx_batch)
        self.stopping = False
        self._quit_sent = False
        self._nginx_quit_at = 0.0
        self._deadline = 0.0
        self.exit_code = 0

    def _workers_listen(self) -> Path | tuple[str, int]:
        """Where the workers listen for Nginx: a unix socket in the run directory
        (``tafe.listeners.bind_unix``), else loopback TCP, when the path is too long for a unix
        socket or Nginx's workers could not reach it: under root they run as "nobody",
        which every directory above must let through."""
        path = self.run_dir / "workers.sock"
        if len(os.fsencode(path)) > UNIX_PATH_MAX:
            why = f"is longer than a unix socket's path may be ({UNIX_PATH_MAX} bytes)"
        elif os.geteuid() == 0 and not all(parent.stat().st_mode & stat.S_IXOTH for parent in path.parents):
            why = "is out of reach of nginx's workers (user nobody)"
        else:
            return path
        self._tcp_why = f"{path} {why}: the workers listen on loopback TCP instead"  # logged once up
        return ("127.0.0.1", 0)

    @staticmethod
    def _overrides(settings: Settings) -> dict[str, float]:
        # The workers keep accepting until a quitting Nginx no longer needs them.
        return {"drain_grace_s": settings.drain_grace_s + nginx_budget_s(settings)}

    def _config(self, settings: Settings) -> str:
        # unix:PATH is already Nginx's form; http://host:port drops its scheme.
        return nginx.render(settings, upstream=self.master.url.removeprefix("http://"), prefix=self.nginx.prefix)

    def run(self) -> int:
        try:
            self.master.open()
            while not self.master.ready and not self.master.finished:
                self._handle(self.master.step(0.5))
            if self.master.ready and not self.stopping:
                self._start_nginx()
            while not (self.master.finished and self._nginx_done()):
                self._handle(self.master.step(0.2))
                self._watch()
            return self.exit_code or self.master.exit_code
        finally:
            if (proc := self.nginx.running()) is not None:
                proc.kill()
                proc.wait()
            self.master.close()
            self._remove_run_dir()

    def _remove_run_dir(self) -> None:
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _start_nginx(self) -> None:
        s = self.settings
        try:
            proc = self.nginx.start(self._config(s), wait_for=(s.host, s.port))
        except nginx.NginxError as exc:
            log.error("%s", exc)
            self.exit_code = 1
            self.stop()
            return
        admin = self.master.admin_address
        log.info(
            "up: public http://%s via nginx (pid %d); workers on %s (pids %s)%s",
            nginx.address(s.host, s.port), proc.pid, self.master.url,
            " ".join(map(str, self.master.serving_pids())), f"; admin http://{nginx.address(*admin)}" if admin else "",
        )  # fmt: skip
        if self._tcp_why:
            log.info("%s", self._tcp_why)
        log.info("try: %s", demo_curl(s.host, s.port))

    def _handle(self, signums: list[int]) -> None:
        for sig in signums:
            if sig == signal.SIGHUP and not self.stopping:
                self.reload()
            elif sig == signal.SIGINT and self.stopping:
                log.warning("second interrupt: killing everything now")
                self._kill()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self.stop()

    def reload(self) -> None:
        new = self.master.reloaded()
        if new is None:
            return
        self.master.worker_overrides = self._overrides(new)
        self.master.roll(new)
        try:
            self.nginx.reload(self._config(new))
        except nginx.NginxError as exc:
            log.error("nginx keeps its running config: %s", exc)

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        now = time.monotonic()
        self._nginx_quit_at = now + self.settings.drain_grace_s
        self._deadline = now + self.settings.drain_grace_s + nginx_budget_s(self.settings) + self.settings.drain_timeout_s + 15
        if not self._nginx_done():
            self.nginx.drain()  # before the workers' /ping turns 503: no answer keeps its connection
        log.info(
            "stopping: answers say Connection: close, /ping answers 503, nginx quits in %.1fs, then the workers drain",
            self.settings.drain_grace_s,
        )
        self.master.stop()

    def _nginx_done(self) -> bool:
        return self.nginx.running() is None

    def _kill(self) -> None:
        self.master.kill()
        if (proc := self.nginx.running()) is not None:
            proc.kill()

    def _watch(self) -> None:
        now = time.monotonic()
        if self._nginx_done() and self.nginx.proc is not None and not self.stopping:
            log.error("nginx %s: stopping", describe_exit(self.nginx.proc.returncode))
            self.exit_code = 1
            self.stop()
        if self.stopping and not self._quit_sent and now >= self._nginx_quit_at and not self._nginx_done():
            self._quit_sent = True
            log.info("nginx quitting gracefully")
            self.nginx.quit()
        if self.stopping and now > self._deadline:
            log.error("stop took too long: killing what is left")
            self.exit_code = 1
            self._kill()
