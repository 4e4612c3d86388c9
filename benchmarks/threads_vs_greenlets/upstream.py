"""The user-data service the I/O-bound handler waits on: answers each GET after a delay.

A gevent ``StreamServer`` speaking just enough keep-alive HTTP/1.1 for ``http.client``:
every request is answered after ``--delay-ms`` with the user's segments (derived from
the user id, so answers are stable). It runs outside the servers being compared, so its
own cost is the same for all of them.

    python benchmarks/threads_vs_greenlets/upstream.py --port 9100 --delay-ms 5
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import zlib  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402


def make_handler(delay_s: float):
    def handle(sock: socket.socket, address: tuple) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            head, buf = buf.split(b"\r\n\r\n", 1)  # GETs only: no request body
            path = head.split(b" ", 2)[1]
            h = zlib.crc32(path)
            body = json.dumps({"segments": [h % 97, h % 89, h % 83], "recency": h % 30}).encode()
            gevent.sleep(delay_s)
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    return handle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=5.0)
    args = parser.parse_args()
    server = StreamServer(("127.0.0.1", args.port), make_handler(args.delay_ms / 1000.0), backlog=1024)
    print(f"user-data service listening on 127.0.0.1:{args.port}, delay {args.delay_ms} ms", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
