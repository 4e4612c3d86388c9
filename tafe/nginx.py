"""TAFE's Nginx: render the shipped config and run a real Nginx as a child process.

The config template lives in ``nginx/tafe.conf.template`` (every choice explained in
its comments); ``render`` fills it from the settings. ``Nginx`` runs the Debian
package's binary with its own prefix (config, pid, temp dirs, all under TAFE's run
directory), in the foreground, so no root is needed and nothing system-wide is
touched. ``tafe up`` uses both; ``tafe nginx render|run`` exposes them alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tafe.children import SignalQueue, child_preexec
from tafe.settings import Settings, SettingsError

log = logging.getLogger("tafe.nginx")

# nginx/tafe.conf.template, through a symlink in the package data so that a wheel
# (not only the source tree) carries it.
TEMPLATE = Path(__file__).resolve().parent / "data" / "nginx.conf.template"
DEFAULT_UPSTREAM = "127.0.0.1:8090"
INSTALL_HINT = "install it from Debian's packages: sudo apt-get install -y nginx"
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_NGINX_LEVEL = {"debug": "info", "info": "warn", "warning": "warn", "error": "error"}
# Idle upstream connections each Nginx worker keeps to TAFE's workers.
UPSTREAM_KEEPALIVE = 64


class NginxError(RuntimeError):
    """Nginx is missing, refused the config, or did not come up."""


def _ms(seconds: float) -> str:
    # Nginx takes no fractional seconds: milliseconds keep the settings' precision.
    return f"{max(0, int(round(seconds * 1000)))}ms"


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def values(settings: Settings, *, upstream: str, prefix: str | os.PathLike[str]) -> dict[str, str]:
    """The template's placeholders, each derived from one or two settings."""
    fmt = "tafe_json" if settings.log_json else "tafe_text"
    # Shorter than the workers' idle timeout AND their drain grace: Nginx closes its
    # idle upstream connections first, and none is left idle when a drain ends.
    upstream_idle_s = max(0.1, min(settings.keepalive_timeout_s, settings.drain_grace_s) / 2)
    return {
        "prefix": str(prefix),
        "error_log_level": _NGINX_LEVEL.get(settings.log_level, "warn"),
        "access_log": f"/dev/stdout {fmt} buffer=32k flush=1s" if settings.access_log else "off",
        "request_id_header": "proxy_set_header X-Request-Id $tafe_request_id;" if settings.access_log else "# (access log off)",
        "listen": address(settings.host, settings.port),
        "upstream": upstream,
        "upstream_keepalive": str(UPSTREAM_KEEPALIVE),
        "upstream_keepalive_timeout": _ms(upstream_idle_s),
        "client_keepalive_timeout": _ms(settings.keepalive_timeout_s),
        "read_timeout": _ms(settings.read_timeout_s),
        "max_body_bytes": str(settings.max_body_bytes),
        "header_buffer": str(max(1024, settings.max_header_bytes)),
        "client_header_buffer": str(min(16384, max(1024, settings.max_header_bytes))),
        "max_tmax_ms": str(settings.max_tmax_ms),
        "connect_timeout": f"{settings.max_tmax_ms}ms",
        # The deadline plus a second for a GC pause or a burst: past that, 504.
        "upstream_timeout": f"{settings.max_tmax_ms + 1000}ms",
    }


def render(settings: Settings, *, upstream: str, prefix: str | os.PathLike[str], template: Path = TEMPLATE) -> str:
    """The Nginx config for these settings, proxying to ``upstream`` (host:port)."""
    vals = values(settings, upstream=upstream, prefix=prefix)

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in vals:
            raise NginxError(f"{template}: unknown placeholder {{{{ {name} }}}}")
        return vals[name]

    return _PLACEHOLDER.sub(fill, template.read_text())


def find_binary(settings: Settings) -> str | None:
    """The nginx executable, also where Debian puts it (/usr/sbin is not on every PATH)."""
    found = shutil.which(settings.nginx)
    if found is None and os.sep not in settings.nginx:
        candidate = Path("/usr/sbin") / settings.nginx
        if os.access(candidate, os.X_OK):
            found = str(candidate)
    return found


def ensure_binary(settings: Settings) -> str | None:
    """Find nginx, installing Debian's package when missing and running as root.

    Returns None (after saying how to install it) when it cannot be had.
    """
    found = find_binary(settings)
    if found is not None or settings.nginx != "nginx":
        if found is None:
            log.warning("nginx binary %r not found", settings.nginx)
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log.warning("nginx is not installed; %s", INSTALL_HINT)
        return None
    log.info("nginx is not installed: installing Debian's package (apt-get install -y nginx)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def apt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    result = apt("install", "-y", "-q", "nginx")
    if result.returncode != 0:  # a fresh machine may have no package lists yet
        apt("update", "-q")
        result = apt("install", "-y", "-q", "nginx")
    if result.returncode != 0:
        log.warning("apt-get install nginx failed; %s\n%s", INSTALL_HINT, result.stdout[-2000:])
    return find_binary(settings)


def _version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0,)


def make_prefix(prefix: Path) -> None:
    """The directories a rendered config expects under its prefix."""
    for sub in ("tmp", "logs"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)


def holds_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` has a TCP socket listening on ``port`` (Linux's /proc;
    elsewhere, unknown: True)."""
    listening = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        try:
            rows = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()  # local address "ADDR:PORT" in hex, state 0A = LISTEN, inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                listening.add(f"socket:[{fields[9]}]")
    fds = Path(f"/proc/{pid}/fd")
    if not fds.is_dir():
        return True
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) in listening:
                return True
        except OSError:
            continue
    return False


class Nginx:
    """One Nginx master (and its workers) as a foreground child, with its own prefix."""

    def __init__(self, binary: str, prefix: str | os.PathLike[str], *, batch: bool = True) -> None:
        self.binary = binary
        self.prefix = Path(prefix)
        self.batch = batch  # SCHED_BATCH: see start()
        self.conf = self.prefix / "nginx.conf"
        # While this file exists every answer closes its connection (the template's
        # file test): how a drain tells clients to go, with no reload.
        self.drain_flag = self.prefix / "draining"
        self.proc: subprocess.Popen[bytes] | None = None
        # -e (1.19.5+): the error log before the config is read, so a non-root Nginx
        # never tries the package's /var/log/nginx/error.log.
        self._early_log = ["-e", "stderr"] if _version(binary) >= (1, 19, 5) else []

    def _cmd(self, *extra: str) -> list[str]:
        return [self.binary, "-p", str(self.prefix), "-c", str(self.conf), *self._early_log, *extra]

    def write(self, config: str) -> None:
        """Install ``config`` (checked by ``nginx -t`` first; the old one stays if bad)."""
        make_prefix(self.prefix)
        if os.geteuid() == 0:
            # Nginx started as root runs its workers as "nobody": they must reach the
            # temp dirs under our (possibly private) prefix.
            os.chmod(self.prefix, 0o755)
        candidate = self.prefix / "nginx.conf.new"
        candidate.write_text(config)
        test = [self.binary, "-t", "-q", "-p", str(self.prefix), "-c", str(candidate), *self._early_log]
        result = subprocess.run(test, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            candidate.unlink()
            raise NginxError(f"nginx refused the config: {result.stdout.strip()}")
        candidate.replace(self.conf)

    def start(self, config: str, wait_for: tuple[str, int] | None = None, timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """Start Nginx and wait until ``wait_for`` (host, port) accepts connections; its process.

        With ``batch`` (the ``nginx_batch`` setting) Nginx runs as ``SCHED_BATCH``, and
        its workers inherit it, also across reloads. Otherwise every wake-up of an
        Nginx worker (a bid arriving, or TAFE's answer to forward) preempts the TAFE
        worker on that core in the middle of a bid: about two context switches per
        request where TAFE and Nginx share a core. A woken batch task runs when the
        TAFE worker waits for the network, or at the next scheduler tick if that worker
        is busy longer than its slice, and then handles everything that came in
        meanwhile in one wake-up; on an idle core it runs at once. The cost: a bid and
        its answer may wait in Nginx while the worker finishes the bids in hand (a few
        tenths of a millisecond more at the median on a busy shared core, no worse at
        p99), bounded by the tick (4 ms at HZ=250), well inside the ``network_margin_ms``
        that TAFE keeps back from ``tmax``. Measured in ``benchmarks/RESULTS.md`` (the
        Nginx hop).
        """
        self.write(config)
        self.drain_flag.unlink(missing_ok=True)  # left by a run that was killed
        preexec = child_preexec(signal.SIGQUIT, batch=self.batch)
        proc = self.proc = subprocess.Popen(self._cmd(), process_group=0, preexec_fn=preexec)
        log.info("nginx started (pid %d, prefix %s)", proc.pid, self.prefix)
        if wait_for is not None:
            self._wait_listening(proc, wait_for, timeout)
        return proc

    def _wait_listening(self, proc: subprocess.Popen[bytes], addr: tuple[str, int], timeout: float) -> None:
        """Until Nginx itself listens on ``addr``: a connection alone could reach another
        process holding the port (Nginx then retries its bind, and exits)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(addr[0], addr[0])
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise NginxError(f"nginx exited with code {proc.returncode} while starting on {address(*addr)}")
            try:
                socket.create_connection((host, addr[1]), timeout=0.5).close()
                if holds_listener(proc.pid, addr[1]):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise NginxError(f"nginx not listening on {address(*addr)} after {timeout:.0f}s") from None
            time.sleep(0.05)

    def drain(self) -> None:
        """From now on every answer says "Connection: close" and closes its connection."""
        self.drain_flag.touch()

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def running(self) -> subprocess.Popen[bytes] | None:
        """The Nginx process if started and not exited, to signal."""
        return self.proc if self.proc is not None and self.proc.poll() is None else None

    def reload(self, config: str) -> bool:
        """New config, graceful: new Nginx workers start, old ones finish their requests.

        Skipped when the config is unchanged: old Nginx workers close their idle client
        keep-alive connections, and a client that sends on one at that moment sees a
        reset (the client-side twin of the 502 race). A rolling restart of TAFE's
        workers alone needs no reload: their address does not change.
        """
        if self.conf.exists() and self.conf.read_text() == config:
            log.info("nginx config unchanged: not reloaded")
            return False
        self.write(config)
        if (proc := self.running()) is not None:
            proc.send_signal(signal.SIGHUP)
            log.info("nginx reloading its config")
        return True

    def quit(self) -> None:
        """Graceful stop: close the listener, finish requests in flight, exit."""
        if (proc := self.running()) is not None:
            proc.send_signal(signal.SIGQUIT)

    def stop(self, timeout: float = 10.0) -> int:
        """Quit gracefully, then kill what is left after ``timeout``."""
        if self.proc is None:
            return 0
        self.quit()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("nginx still running %.0fs after SIGQUIT: killing it", timeout)
            self.proc.kill()
            return self.proc.wait()


# --- tafe nginx render|run ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from tafe.cli import add_settings_options

    parser.add_argument(
        "action",
        choices=("render", "run"),
        help="render: create --run-dir DIR/nginx and print a config for 'nginx -p DIR/nginx -c FILE'; "
        "run: run Nginx with it in the foreground",
    )
    parser.add_argument(
        "--upstream",
        default=DEFAULT_UPSTREAM,
        metavar="HOST:PORT",
        help=f"where TAFE's workers listen, e.g. 'tafe serve --port 8090' (default: {DEFAULT_UPSTREAM})",
    )
    parser.epilog = (
        "Nginx listens on --host/--port. 'run' keeps it in the foreground: SIGHUP re-renders the config "
        "and reloads it, SIGTERM or Ctrl-C stops it gracefully."
    )
    add_settings_options(parser, command)


def run(args: argparse.Namespace) -> int:
    from tafe import logs
    from tafe.cli import settings_from_args

    settings = settings_from_args(args)
    logs.configure(settings)
    if args.action == "render":
        # The config names its pid file and temporary paths: they must outlive this command.
        if not settings.run_dir:
            raise SettingsError("nginx render: run_dir is needed (--run-dir DIR): the config's pid file and temporary paths live in DIR/nginx")
        prefix = (Path(settings.run_dir) / "nginx").resolve()
        try:
            make_prefix(prefix)
        except OSError as exc:
            raise SettingsError(f"run_dir {settings.run_dir!r}: {exc.strerror or exc}") from None
        sys.stdout.write(render(settings, upstream=args.upstream, prefix=prefix))
        return 0
    prefix = Path(settings.run_dir) / "nginx" if settings.run_dir else Path(tempfile.mkdtemp(prefix="tafe-nginx-"))
    binary = ensure_binary(settings)
    if binary is None:
        return 1
    nginx = Nginx(binary, prefix, batch=settings.nginx_batch)
    signals = SignalQueue((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD))
    try:
        nginx.start(render(settings, upstream=args.upstream, prefix=prefix), wait_for=(settings.host, settings.port))
        log.info("nginx listening on http://%s -> %s", address(settings.host, settings.port), args.upstream)
        while nginx.poll() is None:
            for sig in signals.wait(1.0)[0]:
                if sig == signal.SIGHUP:
                    try:
                        settings = settings_from_args(args)
                        nginx.reload(render(settings, upstream=args.upstream, prefix=prefix))
                    except Exception as exc:  # a bad edit must not take the running Nginx down
                        log.error("reload refused, keeping the running config: %s", exc)
                elif sig in (signal.SIGTERM, signal.SIGINT):
                    nginx.quit()
        return nginx.stop()
    except NginxError as exc:
        log.error("%s", exc)
        nginx.stop()
        return 1
    finally:
        signals.close()
        if not settings.run_dir:
            shutil.rmtree(prefix, ignore_errors=True)
