"""HTTP server overhead, side by side: TAFE's server vs gunicorn -k gevent vs gevent.pywsgi.

All three serve the same trivial WSGI app (a fixed ~1.5 KB JSON body, so the numbers
are the servers' own cost, not the bid logic's) on one worker, each loaded in turn by
``wrk`` with the same connections and duration, in one run. Prints requests/s, p50,
p99 and the ratios to gunicorn.

    .venv/bin/python benchmarks/http_micro.py [--connections 64] [--duration 10]

Needs ``wrk`` (apt-get install -y wrk). Loads 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"id":"bench","seatbid":[{"bid":[{"id":"1","impid":"1","price":1.23,"adm":"' + b"x" * 1400 + b'"}]}]}'


def app(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [BODY]


def serve_tafe(port: int) -> int:
    from gevent import monkey

    monkey.patch_all()
    from tafe import server, settings
    from tafe.lifecycle import Lifecycle

    conf = settings.load(environ={}, overrides={"drain_grace_s": 0.0})
    lifecycle = Lifecycle()
    srv = server.Server(server.bind("127.0.0.1", port), app, conf, lifecycle)
    return server.run([srv], conf, lifecycle)


def serve_pywsgi(port: int) -> int:
    from gevent import monkey

    monkey.patch_all()
    from gevent import pywsgi

    class NoDelay(pywsgi.WSGIHandler):
        def __init__(self, sock, *args, **kwargs):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().__init__(sock, *args, **kwargs)

    pywsgi.WSGIServer(("127.0.0.1", port), app, log=None, handler_class=NoDelay).serve_forever()
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def commands(port: int) -> dict[str, list[str]]:
    py = sys.executable
    me = str(Path(__file__).resolve())
    gunicorn = str(Path(py).with_name("gunicorn"))
    return {
        "tafe": [py, me, "serve-tafe", str(port)],
        "gunicorn -k gevent": [
            gunicorn, "-k", "gevent", "-w", "1", "--worker-connections", "1000", "-b", f"127.0.0.1:{port}",
            "--chdir", str(ROOT / "benchmarks"), "--log-level", "warning", "http_micro:app",
        ],
        "gevent.pywsgi": [py, me, "serve-pywsgi", str(port)],
    }


def parse_wrk(out: str) -> tuple[float, float, float]:
    def ms(label: str) -> float:
        match = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rps, ms("50%"), ms("99%")


def pin(core: int) -> list[str]:
    """Server and wrk on different cores when there are two, so they do not fight for one."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core)]
    return []


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children (gunicorn's worker), from /proc."""
    total = 0.0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            total += sum(cpu_seconds(int(child)) * os.sysconf("SC_CLK_TCK") for child in children)
    except OSError:
        return 0.0
    return total / os.sysconf("SC_CLK_TCK")


def bench(name: str, argv: list[str], port: int, connections: int, duration: int) -> tuple[float, float, float, float]:
    proc = subprocess.Popen(pin(0) + argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        wait_listening(port, proc)
        url = f"http://127.0.0.1:{port}/"
        wrk = pin(1) + ["wrk", "-t1", "-c", str(connections)]
        subprocess.run(wrk + ["-d2s", url], capture_output=True, check=True)  # warm up
        cpu_before = cpu_seconds(proc.pid)
        done = subprocess.run(wrk + [f"-d{duration}s", "--latency", url], capture_output=True, text=True, check=True)
        cpu = cpu_seconds(proc.pid) - cpu_before
        rps, p50, p99 = parse_wrk(done.stdout)
        requests = int(re.search(r"(\d+) requests in", done.stdout).group(1))
        return rps, p50, p99, cpu / requests * 1e6
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def machine() -> str:
    import gevent
    import httptools

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"cpu: {cpu}, nproc: {os.cpu_count()}, python {platform.python_version()}, "
        f"gevent {gevent.__version__}, httptools {httptools.__version__}"
    )


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "serve-tafe":
        return serve_tafe(int(sys.argv[2]))
    if len(sys.argv) == 3 and sys.argv[1] == "serve-pywsgi":
        return serve_pywsgi(int(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        parser.exit(2, "wrk not found: apt-get install -y wrk\n")
    print(machine())
    print(f"wrk -t1 -c{args.connections} -d{args.duration}s, one worker each, {len(BODY)} B body, "
          f"{'server on core 0, wrk on core 1' if pin(0) else 'not pinned'}, loadavg {os.getloadavg()[0]:.1f}")
    results = {}
    for name, argv in commands(free_port()).items():
        port = int(argv[argv.index("-b") + 1].rsplit(":", 1)[1]) if "-b" in argv else int(argv[-1])
        results[name] = bench(name, argv, port, args.connections, args.duration)
    base = results["gunicorn -k gevent"][0]
    # CPU per request (server process, user + system, kernel TCP included) moves far
    # less than req/s when other work shares the machine.
    print(f"{'server':<20} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99/p50':>8} {'x gunicorn':>10} {'CPU us/req':>11}")
    for name, (rps, p50, p99, cpu_us) in results.items():
        print(f"{name:<20} {rps:>9.0f} {p50:>8.2f} {p99:>8.2f} {p99 / p50:>8.1f} {rps / base:>10.2f} {cpu_us:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
