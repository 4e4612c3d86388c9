"""Instructions per request of a server (callgrind), the load-independent twin of req/s.

    python benchmarks/throughput/instructions.py [--requests 3000] [--connections 16] [--only NAME]

A rate on this shared 2-core machine drifts with whatever else runs; the instructions a
server executes per request do not. Each server runs under ``valgrind --tool=callgrind``
(all its code: Python, C extensions, libc; not the kernel) while a client outside
valgrind keeps ``--connections`` keep-alive connections busy POSTing the throughput
benchmark's bid request. After a warm-up the counters are zeroed (``callgrind_control
-z``), ``--requests`` more are answered, and the counts are dumped: total instructions
(Ir) over the requests answered in between. The client runs on while the zero and the
dump are taken, so the window is exact to a few in-flight requests (well under 1%).

``run.py --instructions`` adds these counts beside the rates in its table.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import traffic  # noqa: E402

BID_PATH = "/openrtb2/bid"
# Valgrind cannot map the 64 GiB of address space the embedded money state reserves by
# default: under it the server runs with 16 GiB (address space only; same code path).
SHIM = """\
import runpy, sys
import tafe.money.embedded as embedded
embedded.EmbeddedState.__init__.__kwdefaults__["map_size"] = 1 << 34
target = sys.argv[1]
sys.argv = sys.argv[1:] if target != "-m" else sys.argv[2:]
if target == "-m":
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


class Client:
    """Closed-loop keep-alive POSTs on ``connections`` sockets, counting answers."""

    def __init__(self, port: int, body: bytes, connections: int) -> None:
        self.request = (
            f"POST {BID_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"x-openrtb-version: 2.5\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.port = port
        self.answered = 0
        self.failed: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(connections)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=120) as sock:
                while not self._stop.is_set():
                    sock.sendall(self.request)
                    self._read_answer(sock)
                    with self._lock:
                        self.answered += 1
        except Exception as exc:  # reported by the caller, which checks the count
            self.failed = f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _read_answer(sock: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 2"):
            raise ConnectionError(f"answer {head[:40]!r}")
        match = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        length = int(match.group(1)) if match else 0
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            rest += chunk


def _control(option: str, pid: int) -> None:
    subprocess.run(["callgrind_control", option, str(pid)], check=True, capture_output=True, timeout=300)


def _wait_for(client: Client, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while client.answered < count:
        if client.failed or time.monotonic() > deadline:
            raise RuntimeError(f"client: {client.failed or 'too slow'} after {client.answered} answers")
        time.sleep(0.05)


def count(
    cmd: list[str], port: int, body: bytes, log: Path, *, requests: int, connections: int, warmup: int, keep: Path | None = None
) -> dict:
    """Instructions per request of the server ``cmd`` (listening on ``port``) under callgrind."""
    with tempfile.TemporaryDirectory(prefix="tafe-cg-") as tmp:
        out = Path(tmp) / "callgrind.out"
        vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no", "--trace-children=no"]
        vg += [cmd[0], "-c", SHIM, *cmd[1:]]
        proc = common.start(vg, log, env={"PYTHONUNBUFFERED": "1"})
        client = None
        try:
            common.wait_port(port, timeout=300, proc=proc)
            client = Client(port, body, connections)
            client.start()
            _wait_for(client, warmup, 600)
            _control("-z", proc.pid)
            first = client.answered
            _wait_for(client, first + requests, 1200)
            _control("-d", proc.pid)
            answered = client.answered - first
        finally:
            if client is not None:
                client.stop()
            common.stop(proc)
        dumps = sorted(Path(tmp).glob("callgrind.out.*.1"))
        if not dumps:
            raise RuntimeError(f"no callgrind dump (see {log})")
        if keep is not None:  # for callgrind_annotate
            keep.write_bytes(dumps[0].read_bytes())
        totals = re.search(r"^(?:totals|summary): *(\d+)", dumps[0].read_text(errors="replace"), re.M)
        if totals is None:
            raise RuntimeError(f"no totals in {dumps[0]}")
        return {"instructions": int(totals.group(1)), "requests": answered, "per_request": int(totals.group(1)) / answered}


def servers(port: int) -> dict[str, list[str]]:
    """The servers measured, by the names of run.py's rows."""
    py, serve = sys.executable, str(HERE / "serve.py")
    app = "tafe.wsgi:application"
    return {
        "TAFE, 1 worker direct": [py, "-m", "tafe", "serve", "--port", str(port), "--admin-port", "-1", "--workers", "1"],
        "bjoern (C), 1 worker": [py, serve, "bjoern", app, "--port", str(port)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--only", action="append", help="only servers whose name contains this (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep each dump beside its log, for callgrind_annotate")
    args = parser.parse_args()
    body = traffic.sample_body()
    port = common.free_port()
    logs = common.OUT_DIR / "throughput"
    for name, cmd in servers(port).items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        log = logs / ("callgrind-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".log")
        try:
            keep = logs / (log.stem + ".out") if args.keep else None
            r = count(cmd, port, body, log, requests=args.requests, connections=args.connections, warmup=args.warmup, keep=keep)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            print(f"{name}: FAILED: {exc}", flush=True)
            continue
        print(f"{name}: {r['per_request']:,.0f} instructions per request ({r['instructions']:,} over {r['requests']:,})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
