"""What every benchmark needs: the machine, percentiles, child processes, pinning, results.

Benchmarks print everything a reader needs to trust a number (CPU, cores, versions,
pinning, the command) and record it in ``benchmarks/RESULTS.md`` between markers, so
each benchmark owns its own section and re-running it replaces only that section.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
OUT_DIR = BENCH_DIR / "out"
RESULTS = BENCH_DIR / "RESULTS.md"
VENV_BIN = Path(sys.executable).parent
LISTEN_RE = re.compile(r"listening on http://([\d.]+):(\d+)")


# --- the machine ---------------------------------------------------------------------------
def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "absent"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(tools: Iterable[str] = ()) -> dict[str, str]:
    """CPU, cores, OS and the versions of Python, gevent and the named tools."""
    import gevent

    info = {
        "cpu": cpu_model(),
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gevent.__version__,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    commands = {
        "nginx": ["nginx", "-v"],
        "wrk": ["wrk", "--version"],
        "apache2": ["apache2", "-v"],
        "debian python3": ["/usr/bin/python3", "-V"],
    }
    for tool in tools:
        if tool in commands:
            info[tool] = _first_line(commands[tool])
        else:
            info[tool] = package_version(tool)
    return info


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def format_machine(info: Mapping[str, str]) -> str:
    return "\n".join(f"  {k:<15} {v}" for k, v in info.items())


# --- statistics --------------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (0-100) of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo))


def summarize(values: Iterable[float], points: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    data = sorted(values)
    out = {f"p{p:g}": percentile(data, p) for p in points}
    out["max"] = float(data[-1]) if data else float("nan")
    out["n"] = float(len(data))
    return out


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table (readable as plain text too)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


# --- processes, ports, pinning ----------------------------------------------------------------------
def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def split_cores() -> tuple[list[int], list[int], str]:
    """(server cores, load-generator cores, a sentence saying how) for this machine."""
    cs = cores()
    if len(cs) < 2 or not shutil.which("taskset"):
        return cs, cs, f"not pinned ({len(cs)} core(s) shared by server and load generator)"
    half = max(1, len(cs) // 2)
    server, load = cs[:half], cs[half:]
    return server, load, f"server pinned to core(s) {server}, load generator to core(s) {load} (taskset)"


def pinned(cmd: Sequence[str], cpus: Sequence[int] | None) -> list[str]:
    if not cpus or not shutil.which("taskset") or sorted(cpus) == cores():
        return list(cmd)
    return ["taskset", "-c", ",".join(map(str, cpus)), *cmd]


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in the session a server started by ``start``
    leads (its pid is the session's and group's id): the server and its children, also those in
    process groups of their own (``tafe up``'s workers and Nginx)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def start(
    cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None, cpus: Sequence[int] | None = None, cwd: Path = ROOT
) -> subprocess.Popen:
    """Start a server in its own process group, its output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full = pinned(cmd, cpus)
    with open(log, "ab") as fh:
        fh.write(("$ " + shlex.join(full) + "\n").encode())
        fh.flush()
        return subprocess.Popen(
            full, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True
        )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Stop a process started by ``start`` and its group (the children it forked), by id."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, if any
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(5)


def ensure_debian(packages: Mapping[str, str]) -> list[str]:
    """Install the Debian ``package`` of each missing ``path-or-binary``; returns what is still missing."""
    missing = {p for b, p in packages.items() if not (shutil.which(b) or Path(b).exists())}
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "-qq"]
        print(f"setup: apt-get install {' '.join(sorted(missing))}", flush=True)
        subprocess.run([*apt, "update"], env=env, check=False, stdout=subprocess.DEVNULL)
        subprocess.run(
            [*apt, "install", "-y", "--no-install-recommends", *sorted(missing)], env=env, check=False, stdout=subprocess.DEVNULL
        )
    return [b for b in packages if not (shutil.which(b) or Path(b).exists())]


# --- recording -------------------------------------------------------------------------------------
RESULTS_HEADER = """# Benchmark results

Numbers measured on the project's own development machine by `make bench` (and the
commands quoted in each section). Each section is written by the benchmark it names and
replaced when that benchmark runs again; the machine, the versions and the exact command
sit with the numbers. The machine is small and shared (other test suites may run on the
same cores), so absolute figures are noisy: the ratios, measured side by side in one run,
are what to compare.
"""


def record(section: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the ``section`` of RESULTS.md, delimited by HTML comments."""
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    old = path.read_text() if path.exists() else RESULTS_HEADER
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"
