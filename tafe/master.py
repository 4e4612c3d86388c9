"""The pre-fork master: holds the listening sockets, spawns, restarts and rolls workers.

Deliberately small and NOT gevent-patched: it only waits on signals, readiness pipes
and child exits (one ``select`` loop, no threads), so nothing a worker does can stall
it. Each worker is a fresh interpreter (``python -m tafe worker --listen-fd F``), not a
``fork`` of this one: it monkey-patches before importing anything else, and a rolling
restart runs new code with freshly read config.

- The master binds the public (and admin) listener once and passes the same sockets to
  every worker: the kernel spreads connections over them, and old and new workers
  share the socket during a rolling restart, so no connection is ever refused.
- A worker says it is ready by writing to a pipe once its apps are built and it is
  about to accept; one that cannot start because of a configuration mistake (a bad
  campaigns, model or store file) writes that one-line reason instead and exits.
  Restarting it would fail the same way: at start-up the master stops the others and
  exits non-zero with the reason (``tafe`` prints it once); later (a crashed worker
  restarted with a file broken since) it logs it, drains and exits non-zero.
- SIGTERM / SIGINT: every worker drains (``/ping`` 503 for the grace, then stops
  accepting and finishes in-flight requests); the master exits 0 once all have.
  A second SIGINT (Ctrl-C twice) kills them at once.
- SIGHUP: rolling restart, one worker at a time: start the new one, wait for its
  readiness, then drain the old one (SIGUSR2: the drain of SIGTERM, but ``/ping``
  stays 200, so the balancer keeps the machine) and wait for it to exit.
- A worker that dies unasked is restarted at once, then with a growing backoff if it
  keeps dying; the log line says why (exit code or signal), the new worker counts it
  in ``tafe_worker_restarts_total{cause}``.
- Workers run in their own process group (a terminal's Ctrl-C reaches only the
  master, which then drains them in order) and get SIGTERM if the master itself dies.

Metrics: Prometheus multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` under the run
directory, emptied at start; every worker that exits is retired: its live gauges
dropped, its counts folded into an archive, ``tafe.metrics.retire_worker``). One
scrape target per machine whatever the number of workers, and counters keep counting
across restarts (with per-worker endpoints every rolling restart would reset them and
Prometheus would need to discover worker ports). See ``tafe.metrics.exposition``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tafe.children import SignalQueue, cause_label, child_preexec, describe_exit
from tafe.listeners import bind, bind_unix
from tafe.money import node_settings, warn_if_random_key
from tafe.settings import Settings, SettingsError, demo_curl

log = logging.getLogger("tafe.master")

READY_TIMEOUT_S = 120.0  # loading a large CQS store can take a while
STABLE_S = 10.0  # a worker that served this long before dying restarts without backoff
MAX_BACKOFF_S = 10.0


def run_directory(given: str | os.PathLike[str] | None, prefix: str) -> Path:
    """The directory for runtime files: ``given``, created if missing, else a new temporary one."""
    if not given:
        return Path(tempfile.mkdtemp(prefix=prefix))
    path = Path(given)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"run_dir {str(path)!r}: {exc.strerror or exc}") from None
    return path


@dataclass(eq=False)
class Worker:
    slot: int
    proc: subprocess.Popen[bytes]
    ready_fd: int | None
    started: float
    state: str = "starting"  # starting -> serving -> draining
    ready_at: float = 0.0
    drain_deadline: float = 0.0
    failure: str = ""  # the worker's start-up error, from its readiness pipe

    @property
    def pid(self) -> int:
        return self.proc.pid


class Master:
    """Worker processes of one machine around shared listeners. Drive it with ``step``."""

    def __init__(
        self,
        settings: Settings,
        *,
        reload: Callable[[], Settings] | None = None,
        listen: tuple[str, int] | Path | None = None,
        worker_overrides: dict[str, Any] | None = None,
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings
        self.n = max(1, settings.workers)
        self._reload = reload
        # (host, port), or a unix socket's path (behind Nginx, tafe up).
        self._listen = listen or (settings.host, settings.port)
        self._public = listen is None  # clients reach the workers directly (no Nginx in front)
        self.worker_overrides = dict(worker_overrides or {})
        self._own_run_dir = not (run_dir or settings.run_dir)
        self.run_dir = run_directory(run_dir or settings.run_dir, prefix="tafe-")
        # Made once for every worker: the money state's directory and the notice keys.
        try:
            self.settings = settings = node_settings(settings, self.run_dir)
        except BaseException:  # e.g. a notice keys file that cannot be read: leave nothing behind
            self.remove_run_dir()
            raise
        self.metrics_dir = self.run_dir / "metrics"
        self.listener: socket.socket | None = None
        self.admin_listener: socket.socket | None = None
        self.signals: SignalQueue | None = None
        self.workers: list[Worker] = []
        self.slots: dict[int, Worker | None] = {i: None for i in range(self.n)}
        self._failures = [0] * self.n
        self._respawn: dict[int, tuple[float, str]] = {}  # slot -> (when, cause)
        self._roll: list[int] = []
        self._roll_new: Worker | None = None
        self._roll_old: Worker | None = None
        self._rolling = False
        self.ready = False  # every first worker has reported ready
        self.stopping = False
        self._stop_deadline = 0.0
        self.exit_code = 0

    def remove_run_dir(self) -> None:
        """Remove the run directory if this master made it (a temporary one)."""
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # --- life cycle ------------------------------------------------------------------

    def open(self) -> None:
        """Bind the listeners, empty the metrics directory, start every worker."""
        self.signals = SignalQueue((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD))
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # nothing inherited may block them
        self.listener = bind_unix(self._listen) if isinstance(self._listen, Path) else bind(*self._listen)
        if self.settings.admin_port >= 0:
            self.admin_listener = bind(self.settings.admin_host, self.settings.admin_port)
        if self.metrics_dir.exists():
            shutil.rmtree(self.metrics_dir)
        self.metrics_dir.mkdir(parents=True)
        for slot in range(self.n):
            self._spawn(slot)

    def _opened(self) -> tuple[socket.socket, SignalQueue]:
        """The listener and the signal queue, which ``open`` makes."""
        if self.listener is None or self.signals is None:
            raise RuntimeError("Master.open() must come first")
        return self.listener, self.signals

    @property
    def address(self) -> tuple[str, int]:
        """The listener's (host, port); a unix socket's is (path, 0)."""
        name = self._opened()[0].getsockname()
        return (name, 0) if isinstance(name, str) else (name[0], name[1])

    @property
    def url(self) -> str:
        """Where the workers listen, for logs: http://host:port, or unix:path."""
        host, port = self.address
        return f"unix:{host}" if isinstance(self._listen, Path) else f"http://{host}:{port}"

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return None if self.admin_listener is None else self.admin_listener.getsockname()[:2]

    @property
    def finished(self) -> bool:
        return self.stopping and not self.workers

    def serving_pids(self) -> list[int]:
        return [w.pid for w in self.slots.values() if w is not None]

    def close(self) -> None:
        """Kill what is left (normally nothing), release sockets and the run directory."""
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        for sock in (self.listener, self.admin_listener):
            if sock is not None:
                sock.close()
        if isinstance(self._listen, Path) and self.listener is not None:
            self._listen.unlink(missing_ok=True)
        if self.signals is not None:
            self.signals.close()
            self.signals = None
        self.remove_run_dir()

    def serve(self) -> int:
        """``tafe serve --workers N``: run until every worker has drained.

        Raises ``SettingsError`` if a listener cannot be opened or a first worker
        reports a configuration mistake."""
        try:
            self.open()
            while not self.finished:
                for sig in self.step(1.0):
                    if sig == signal.SIGHUP:
                        self.roll(self.reloaded())
                    elif sig == signal.SIGINT and self.stopping:
                        log.warning("second interrupt: killing the workers now")
                        self.kill()
                    elif sig in (signal.SIGTERM, signal.SIGINT):
                        self.stop()
            return self.exit_code
        finally:
            self.close()

    def reloaded(self) -> Settings | None:
        """Settings read anew for a rolling restart; None (and a log line) if they are bad."""
        if self._reload is None:
            return self.settings
        try:
            new = self._reload()
        except SettingsError as exc:
            log.error("SIGHUP: settings not reloaded, workers not restarted: %s", exc)
            return None
        if new.workers != self.settings.workers or (new.host, new.port) != (self.settings.host, self.settings.port):
            log.warning("SIGHUP: the number of workers and the listening address change only on a full restart")
        return new

    # --- the event loop ----------------------------------------------------------------

    def step(self, timeout: float) -> list[int]:
        """Wait for one round of events, act on workers; return the other signals seen."""
        now = time.monotonic()
        wait = min([timeout] + [when - now for when, _ in self._respawn.values()])
        fds = [w.ready_fd for w in self.workers if w.ready_fd is not None]
        signums, readable = self._opened()[1].wait(wait, fds)
        for fd in readable:
            self._read_ready(fd)
        self._reap()
        self._tick()
        return [s for s in signums if s != signal.SIGCHLD]

    def roll(self, settings: Settings | None = None) -> None:
        """Rolling restart, one slot at a time (new worker ready, then old one drains)."""
        if settings is None or self.stopping:
            return
        settings = settings.with_overrides(workers=self.settings.workers, host=self.settings.host, port=self.settings.port)
        self.settings = node_settings(settings.with_overrides(state=settings.state or self.settings.state), self.run_dir, self.settings)
        self._roll = list(range(self.n))
        self._rolling = True
        log.info("rolling restart of %s", _workers(self.n))

    def stop(self) -> None:
        """Drain every worker; ``finished`` turns true when all have exited."""
        if self.stopping:
            return
        self.stopping = True
        self._roll.clear()
        self._respawn.clear()
        self._roll_new = self._roll_old = None
        worker_settings = self._worker_settings()
        self._stop_deadline = time.monotonic() + worker_settings.drain_grace_s + worker_settings.drain_timeout_s + 10.0
        log.info("stopping: draining %s", _workers(len(self.workers)))
        for w in self.workers:
            self._drain(w)

    def kill(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()

    # --- internals ---------------------------------------------------------------------

    def _worker_settings(self) -> Settings:
        return self.settings.with_overrides(**self.worker_overrides)

    def _spawn(self, slot: int, cause: str = "") -> Worker:
        settings = self._worker_settings()
        listen_fd = self._opened()[0].fileno()
        ready_r, ready_w = os.pipe()
        fds = [listen_fd, ready_w]
        cmd = [
            sys.executable, "-m", "tafe", "worker",
            "--listen-fd", str(listen_fd),
            "--ready-fd", str(ready_w),
            "--slot", str(slot),
            "--settings", json.dumps({**dataclasses.asdict(settings), "notice_keys": ""}),
        ]  # fmt: skip
        if self.admin_listener is not None:
            cmd += ["--admin-fd", str(self.admin_listener.fileno())]
            fds.append(self.admin_listener.fileno())
        if cause:
            cmd += ["--restart-cause", cause]
        # The notice keys go by environment, not on the command line (which any local user can read).
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir), "TAFE_NOTICE_KEYS": settings.notice_keys}
        try:
            proc = subprocess.Popen(
                cmd, pass_fds=fds, env=env, process_group=0, preexec_fn=child_preexec(signal.SIGTERM)
            )
        finally:
            os.close(ready_w)
        worker = Worker(slot, proc, ready_r, time.monotonic())
        self.workers.append(worker)
        # The first start-up is summed up by "listening on ... (pids ...)" or one error line.
        log.log(logging.INFO if self.ready else logging.DEBUG, "worker %d started (pid %d)", slot, proc.pid)
        return worker

    def _read_ready(self, fd: int) -> None:
        worker = next((w for w in self.workers if w.ready_fd == fd), None)
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        os.close(fd)
        if worker is None:
            return
        worker.ready_fd = None
        if data.startswith(b"!"):  # a configuration mistake; the worker exits, _reap acts on it
            worker.failure = data[1:].decode("utf-8", "replace").strip()
        elif data and worker.state == "starting":
            self._on_ready(worker)
        # End of file without a byte: the worker died before it was ready; _reap says why.

    def _on_ready(self, w: Worker) -> None:
        w.state = "serving"
        w.ready_at = time.monotonic()
        old = self.slots.get(w.slot)
        self.slots[w.slot] = w
        log.info("worker %d ready (pid %d)", w.slot, w.pid)
        if w is self._roll_new:
            self._roll_new = None
            self._roll_old = old
            if old is not None:
                self._drain(old, signal.SIGUSR2)
        if not self.ready and all(self.slots.values()):
            self.ready = True
            admin = self.admin_address
            if self._public:
                log.info("try: %s", demo_curl(*self.address))  # before "listening on", as tafe serve does
            log.info(
                "listening on %s%s with %d workers (pids %s)",
                self.url, f" (admin http://{admin[0]}:{admin[1]})" if admin else "", self.n,
                " ".join(map(str, self.serving_pids())),
            )  # fmt: skip
            warn_if_random_key(self.settings)

    def _drain(self, w: Worker, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: the machine stops (/ping 503 first); SIGUSR2: this worker is replaced."""
        if w.state == "draining":
            return  # a second signal would cut its grace short
        w.state = "draining"
        settings = self._worker_settings()
        w.drain_deadline = time.monotonic() + settings.drain_grace_s + settings.drain_timeout_s + 10.0
        if self.slots.get(w.slot) is w:
            self.slots[w.slot] = None
        if w.proc.poll() is None:
            w.proc.send_signal(sig)
            log.info("worker %d %s (pid %d)", w.slot, "replaced, draining" if sig == signal.SIGUSR2 else "draining", w.pid)

    def _reap(self) -> None:
        for w in list(self.workers):
            code = w.proc.poll()
            if code is None:
                continue
            self.workers.remove(w)
            if w.ready_fd is not None:  # what it wrote before exiting, if anything
                self._read_ready(w.ready_fd)
            self._forget_metrics(w.pid)
            self._on_exit(w, code)

    def _forget_metrics(self, pid: int) -> None:
        from tafe import metrics

        metrics.retire_worker(str(self.metrics_dir), pid)

    def _on_exit(self, w: Worker, code: int) -> None:
        how = describe_exit(code)
        if w.failure and not self.ready and not self.stopping:
            raise SettingsError(w.failure)  # serve's caller prints it; close() ends the others
        if w.state == "draining" or self.stopping:
            if not w.ready_at:
                log.info("worker %d (pid %d) stopped before it was ready (%s)", w.slot, w.pid, how)
            else:
                log.log(logging.INFO if code == 0 else logging.WARNING, "worker %d (pid %d) %s after draining", w.slot, w.pid, how)
            if w is self._roll_old:
                self._roll_old = None
            return
        now = time.monotonic()
        if w.state == "starting":
            log.error("worker %d (pid %d) %s before it was ready%s", w.slot, w.pid, how, f": {w.failure}" if w.failure else "")
            if not self.ready:
                log.error("a worker could not start: stopping")
                self.exit_code = 1
                self.stop()
                return
            if w is self._roll_new:
                log.error("rolling restart abandoned: the old workers keep serving")
                self._roll_new = None
                self._roll.clear()
                self._rolling = False
                return
            if w.failure:  # restarting it would fail the same way
                log.error("stopping: a worker cannot start with the current configuration")
                self.exit_code = 1
                self.stop()
                return
        else:
            self.slots[w.slot] = None
            log.warning("worker %d (pid %d) %s; restarting it", w.slot, w.pid, how)
            if self._roll_new is not None and self._roll_new.slot == w.slot:
                return  # its replacement is already starting
            if now - w.ready_at >= STABLE_S:
                self._failures[w.slot] = 0
        self._failures[w.slot] += 1
        failures = self._failures[w.slot]
        delay = 0.0 if failures == 1 else min(MAX_BACKOFF_S, 0.1 * 2 ** (failures - 2))
        if delay:
            log.warning("worker %d failed %d times in a row: next start in %.1fs", w.slot, failures, delay)
        self._respawn[w.slot] = (now + delay, cause_label(code))

    def _tick(self) -> None:
        now = time.monotonic()
        for slot, (when, cause) in list(self._respawn.items()):
            if when <= now:
                del self._respawn[slot]
                self._spawn(slot, cause)
        for w in self.workers:
            late = (w.state == "starting" and now - w.started > READY_TIMEOUT_S) or (
                w.state == "draining" and now > w.drain_deadline
            )
            if late and w.proc.poll() is None:
                log.error("worker %d (pid %d) stuck %s: killing it", w.slot, w.pid, w.state)
                w.proc.kill()
        if self.stopping:
            if now > self._stop_deadline and self.workers:
                self.exit_code = 1
                self.kill()
            return
        if self._roll_new is None and self._roll_old is None:
            if self._roll:
                slot = self._roll.pop(0)
                self._respawn.pop(slot, None)
                self._roll_new = self._spawn(slot)
            elif self._rolling:
                self._rolling = False
                log.info("rolling restart done: workers %s", " ".join(map(str, self.serving_pids())))


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("socket")


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """``tafe serve --workers N``: the master in the foreground; returns the exit code.

    ``tafe.cli`` has monkey-patched this process for ``serve``; the master must not be
    (its loop is plain blocking ``select``), so it replaces itself with a fresh,
    unpatched interpreter (same PID, same terminal) that re-reads the same command line.
    """
    if _gevent_patched():
        if sys.argv[1:2] != ["serve"]:
            raise RuntimeError("the pre-fork master must run in a process gevent has not patched")
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "tafe.master", *sys.argv[1:]])
    return Master(settings, reload=reload).serve()


def _main(argv: list[str]) -> int:
    """``python -m tafe.master serve ...``: the same command line, unpatched."""
    from tafe import cli, logs

    parser = cli.build_parser(only="serve")
    args = parser.parse_args(argv)

    def reload() -> Settings:
        return cli.settings_from_args(args)

    try:
        settings = reload()
        logs.configure(settings)
        return run(settings, reload)
    except SettingsError as exc:
        parser.exit(2, f"tafe: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
