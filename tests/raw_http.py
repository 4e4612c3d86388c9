"""Raw HTTP against a real TAFE server process: the harness of the HTTP server tests.

``tests/http/serve_app.py`` runs ``tafe.server`` with a small WSGI app (and, with
``TEST_DIRECT=1``, a fast-path ``handle``); ``ServerProcess`` starts it with tight limits,
``Reader`` reads answers off a socket framed per RFC 9112, ``exchange`` sends raw bytes
and reads what comes back. ``tests/http/requests/*.http`` is a corpus of raw requests,
each headed by ``# key: value`` lines saying what must come back (``load_case``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "http"
CORPUS = sorted((HERE / "requests").glob("*.http"))
LIMITS = {
    "TAFE_MAX_BODY_BYTES": "4096",
    "TAFE_MAX_HEADER_BYTES": "2048",
    "TAFE_READ_TIMEOUT_S": "1.0",
    "TAFE_KEEPALIVE_TIMEOUT_S": "5",
    "TAFE_DRAIN_GRACE_S": "0.5",
    "TAFE_DRAIN_TIMEOUT_S": "10",
}


class ServerProcess:
    def __init__(self, listener: socket.socket | None = None, **env: str) -> None:
        environ = dict(os.environ, TAFE_HOST="127.0.0.1", TAFE_PORT="0", PYTHONPATH=str(ROOT), **LIMITS)
        environ.update(env)
        fds = ()
        if listener is not None:
            environ["TEST_LISTEN_FD"] = str(listener.fileno())
            fds = (listener.fileno(),)
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "serve_app.py")],
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=fds,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        self.port = int(line.split()[1])

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.stderr.read()


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> dict:
        return json.loads(self.body)


class Reader:
    """Reads responses off a socket, one at a time (framing per RFC 9112)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed mid-body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed mid-head")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def closed(self) -> bool:
        """True if the server closed the connection with nothing more to read."""
        return not self.buf and not self._fill()

    def response(self, head: bool = False) -> Response:
        status_line = self._line()
        version, code = status_line.split(b" ", 2)[:2]
        assert version == b"HTTP/1.1", status_line
        headers: dict[str, str] = {}
        while line := self._line():
            name, value = line.decode("latin-1").split(":", 1)
            headers[name.lower()] = value.strip()
        status = int(code)
        if head or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b"")
        if "content-length" in headers:
            return Response(status, headers, self._take(int(headers["content-length"])))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int(self._line().split(b";")[0], 16):
                body += self._take(size)
                assert self._take(2) == b"\r\n"
            assert self._line() == b""
            return Response(status, headers, body)
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return Response(status, headers, body)


def exchange(server: ServerProcess, raw: bytes, count: int = 1, head: bool = False) -> tuple[list[Response], bool]:
    """Send raw bytes; read ``count`` responses; report whether the server then closed."""
    with server.connect() as sock:
        sock.sendall(raw)
        reader = Reader(sock)
        responses = [reader.response(head=head) for _ in range(count)]
        sock.settimeout(0.2)
        try:
            closed = reader.closed()
        except TimeoutError:
            closed = False
        return responses, closed


def load_case(path: Path) -> tuple[dict[str, list[str]], bytes]:
    text = path.read_text()
    meta: dict[str, list[str]] = {}
    lines = text.split("\n")
    while lines and lines[0].startswith("# "):
        key, _, value = lines.pop(0)[2:].partition(": ")
        meta.setdefault(key, []).append(value)
    return meta, "\n".join(lines).replace("\n", "\r\n").encode("latin-1")
