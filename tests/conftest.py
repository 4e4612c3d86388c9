"""Shared fixtures: real TAFE server processes on 127.0.0.1 and the shared OpenRTB examples."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_EXAMPLES = ROOT.parent / "shared" / "openrtb" / "examples"
LISTEN_RE = re.compile(r"listening on http://([\d.]+):(\d+)(?: \(admin http://([\d.]+):(\d+)\))?")


def pytest_configure(config: pytest.Config) -> None:
    """One temporary directory for the run, this process's and every process it starts
    (``TMPDIR``), removed at the end: what a process killed on purpose (SIGKILL) could not
    clean up (a run directory, a sealed copy's link) goes with it. World-readable, as Nginx's
    workers run as "nobody" under root and must reach the run directories in it."""
    scratch = tempfile.mkdtemp(prefix="tafe-tests-")
    os.chmod(scratch, 0o755)
    config.stash[_SCRATCH] = (scratch, os.environ.get("TMPDIR"))
    os.environ["TMPDIR"] = scratch
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def pytest_unconfigure(config: pytest.Config) -> None:
    scratch, before = config.stash.get(_SCRATCH, (None, None))
    if scratch is None:
        return
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None
    shutil.rmtree(scratch, ignore_errors=True)


_SCRATCH = pytest.StashKey[tuple[str, "str | None"]]()


def shared_examples() -> list[Path]:
    """The real OpenRTB requests in ../shared (read there, never copied into the repo)."""
    return sorted(SHARED_EXAMPLES.glob("*.json"))


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str = ""
    admin_url: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return stop_process(self.proc, sig, timeout)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
    """Signal a process the test started (by its PID); SIGKILL it if it outlives ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def start_tafe(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0) -> ServerProcess:
    """Start ``python -m tafe serve --workers 1 --port 0 ...`` and wait for its "listening on" line."""
    cmd = [sys.executable, "-m", "tafe", "serve", "--workers", "1", "--port", "0", "--admin-port", "0", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT)
    server = ServerProcess(proc)
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            server.lines.append(line)
            m = LISTEN_RE.search(line)
            if m and not ready.is_set():
                server.url = f"http://{m.group(1)}:{m.group(2)}"
                if m.group(4):
                    server.admin_url = f"http://{m.group(3)}:{m.group(4)}"
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError("TAFE did not start in time:\n" + server.output())
    if not server.url:
        server.stop(signal.SIGKILL)
        raise RuntimeError("TAFE exited before listening:\n" + server.output())
    return server


@pytest.fixture(scope="module")
def tafe_server():
    """One real TAFE process (one worker) for a test module; stopped by its PID."""
    server = start_tafe()
    yield server
    server.stop()
