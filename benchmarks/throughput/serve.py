"""Serve one WSGI app with one of the single-process servers the benchmarks compare.

    python benchmarks/throughput/serve.py {tafe,pywsgi,bjoern,meinheld} --port P APP [--path DIR]

``APP`` is ``module:attribute`` (``tafe.wsgi:application``, or the benchmark's own
handler with ``--path`` naming its directory). ``tafe`` is TAFE's own gevent server
(``tafe.server``) around the app; ``pywsgi`` is stock ``gevent.pywsgi`` with
``TCP_NODELAY`` on accepted sockets (without it each keep-alive response stalls ~40 ms
on Nagle/delayed ACK, which would measure the kernel, not the server); ``bjoern`` is the
C server (not cooperative), where it is installed; ``meinheld`` is the C server with
greenlets (its last release, 1.0.2, pins greenlet < 0.5, which does not build on Python
3.11: it is installed with ``--no-deps`` over the newer greenlet, where that works).
gunicorn and granian have their own command lines.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def load_app(spec: str, path: str | None):
    if path:
        sys.path.insert(0, path)
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr or "application")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=("tafe", "pywsgi", "bjoern", "meinheld"))
    parser.add_argument("app")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", help="directory put first on sys.path before importing APP")
    args = parser.parse_args()

    if args.server == "bjoern":
        import bjoern

        app = load_app(args.app, args.path)
        print(f"listening on http://127.0.0.1:{args.port} (bjoern)", flush=True)
        bjoern.run(app, "127.0.0.1", args.port)
        return

    if args.server == "meinheld":
        from meinheld import server as meinheld_server

        app = load_app(args.app, args.path)
        meinheld_server.set_access_logger(None)
        meinheld_server.listen(("127.0.0.1", args.port))
        print(f"listening on http://127.0.0.1:{args.port} (meinheld)", flush=True)
        meinheld_server.run(app)
        return

    from gevent import monkey

    monkey.patch_all()
    app = load_app(args.app, args.path)
    if args.server == "pywsgi":
        import socket

        from gevent.pywsgi import WSGIHandler, WSGIServer

        class NoDelayHandler(WSGIHandler):
            def __init__(self, sock, address, server, rfile=None):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                super().__init__(sock, address, server, rfile)

        server = WSGIServer(("127.0.0.1", args.port), app, handler_class=NoDelayHandler, log=None, backlog=2048)
        print(f"listening on http://127.0.0.1:{args.port} (gevent.pywsgi)", flush=True)
        server.serve_forever()
        return

    from tafe import server as tafe_server
    from tafe import settings as tafe_settings
    from tafe.lifecycle import Lifecycle

    settings = tafe_settings.load(overrides={"host": "127.0.0.1", "port": args.port, "drain_grace_s": 0.0})
    lifecycle = Lifecycle()
    srv = tafe_server.Server(tafe_server.bind("127.0.0.1", args.port), app, settings, lifecycle)
    print(f"listening on http://127.0.0.1:{args.port} (tafe.server)", flush=True)
    sys.exit(tafe_server.run([srv], settings, lifecycle))


if __name__ == "__main__":
    main()
