"""The user-data service the I/O-bound handler waits on: answers each GET after the user's delay.

A gevent ``StreamServer`` speaking just enough keep-alive HTTP/1.1 for ``http.client``.
``GET /user/<id>`` is answered with the user's segments after ``delay_ms(id)``: a
lognormal lookup time (by default median 3 ms, sigma 0.5: mean 3.4, p90 5.7, p99 9.6,
p99.9 14.1 ms), the long tail of a real user store where most lookups hit a cache and some go
to disk or another node. The quantile is picked by a hash of the user id, so the delay
is a property of the request: the same request sequence gives every server the same
delays, and the benchmark can print the upstream's own share of each percentile.
``--sigma 0`` makes every lookup take ``--median-ms`` (a constant delay). The service
runs outside the servers being compared, so its own cost is the same for all of them.

    python benchmarks/threads_vs_greenlets/upstream.py --port 9100 [--median-ms 3 --sigma 0.5]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import zlib  # noqa: E402
from statistics import NormalDist  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

MEDIAN_MS = 3.0
SIGMA = 0.5
_NORMAL = NormalDist()


def delay_ms(user_id: str, median_ms: float = MEDIAN_MS, sigma: float = SIGMA) -> float:
    """The user's lookup time: the lognormal quantile at a uniform hash of the id."""
    if sigma <= 0:
        return median_ms
    h = int.from_bytes(hashlib.blake2b(user_id.encode(), digest_size=8).digest(), "big")
    return median_ms * math.exp(sigma * _NORMAL.inv_cdf((h + 0.5) / 2**64))


def make_handler(median_ms: float, sigma: float):
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
            gevent.sleep(delay_ms(path.rpartition(b"/")[2].decode(), median_ms, sigma) / 1000.0)
            sock.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    return handle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--median-ms", type=float, default=MEDIAN_MS, help="median lookup time")
    parser.add_argument("--sigma", type=float, default=SIGMA, help="lognormal shape (0: every lookup takes the median)")
    args = parser.parse_args()
    server = StreamServer(("127.0.0.1", args.port), make_handler(args.median_ms, args.sigma), backlog=1024)
    print(f"user-data service listening on 127.0.0.1:{args.port}, lookup median {args.median_ms} ms, sigma {args.sigma}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
