"""A real TAFE server process serving a small test WSGI app (used by the tests over tests/raw_http.py).

Settings come from TAFE_* environment variables; it prints ``PORT <n>`` once listening.
With ``TEST_DIRECT=1`` the app also has a fast path (``handle``) for ``/direct/*``.
"""

from gevent import monkey

monkey.patch_all()

import itertools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

from tafe import logs, server, settings  # noqa: E402
from tafe.lifecycle import Lifecycle  # noqa: E402


def make_app(lifecycle: Lifecycle):
    sequence = itertools.count()
    gate = {"waiting": 0, "open": gevent.event.Event()}

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/gate":  # hold each caller until N of them are here
            gate["waiting"] += 1
            if gate["waiting"] >= int(environ["QUERY_STRING"]):
                gate["open"].set()
            gate["open"].wait(10)
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"open"]
        if path == "/seq":  # the order in which the server ran requests
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(next(sequence)).encode()]
        if path == "/ping":
            if lifecycle.draining:
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"draining"]
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"pong"]
        if path == "/excinfo":  # an app replacing its answer before sending any of it
            start_response("200 OK", [("Content-Type", "text/plain")])
            try:
                raise ValueError("changed its mind")
            except ValueError:
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
            return [b"replaced"]
        if path == "/broken-stream":  # fails after part of the body is out
            def parts():
                start_response("200 OK", [("Content-Type", "text/plain")])
                yield b"first;"
                raise RuntimeError("the stream breaks on purpose")
            return parts()
        if path == "/boom":
            raise RuntimeError("the test app fails on purpose")
        if path == "/slow":
            gevent.sleep(float(environ["QUERY_STRING"] or "1"))
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"slow done"]
        if path == "/stream":
            def chunks():
                start_response("200 OK", [("Content-Type", "text/plain")])
                for i in range(3):
                    yield b"part%d;" % i
            return chunks()
        if path == "/write":
            write = start_response("200 OK", [("Content-Type", "text/plain")])
            write(b"written;")
            return [b"returned"]
        if path == "/empty":
            start_response("204 No Content", [])
            return [b""]
        body = environ["wsgi.input"].read()
        doc = {
            "method": environ["REQUEST_METHOD"],
            "path": environ["PATH_INFO"],
            "query": environ["QUERY_STRING"],
            "protocol": environ["SERVER_PROTOCOL"],
            "content_length": environ.get("CONTENT_LENGTH", ""),
            "body": body.decode("latin-1"),
            "request_id": environ["tafe.request_id"],
            "pid": os.getpid(),
            "arrival": environ["tafe.arrival"],
            "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
            "environ": {k: v for k, v in environ.items() if isinstance(v, (str, bool, int, tuple))},
        }
        out = json.dumps(doc).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [out]

    return app


class DirectApp:
    """The test app with a fast path (``handle``, as TAFE's public app has) for ``/direct/*``:
    the server calls it without WSGI; any other path goes to the WSGI app."""

    def __init__(self, app) -> None:
        self.app = app

    def __call__(self, environ, start_response):
        return self.app(environ, start_response)

    def handle(self, method, path, environ):
        if not path.startswith("/direct/"):
            return None
        if path == "/direct/boom":
            raise RuntimeError("the test handle fails on purpose")
        if path == "/direct/framed":  # framing is the server's: refused, 500
            return "200 OK", [("Content-Length", "1")], b"x"
        if path == "/direct/slow":
            gevent.sleep(3)
        if path == "/direct/big":  # more than a socket buffer takes at once
            return "200 OK", [("Content-Type", "text/plain")], b"0123456789abcdef" * (1 << 19)
        if path == "/direct/empty":
            return "204 No Content", [("X-Seen", method)], b""
        doc = {
            "by": "handle", "method": method, "path": path, "body": environ["tafe.body"].decode("latin-1"),
            "arrival": environ["tafe.arrival"], "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
        }  # fmt: skip
        return "200 OK", [("Content-Type", "application/json")], json.dumps(doc).encode()


def main() -> int:
    conf = settings.load()
    logs.configure(conf)
    lifecycle = Lifecycle()
    inherited = os.environ.get("TEST_LISTEN_FD")
    if inherited:  # as from a pre-fork master: a plain socket made before gevent
        listener = monkey.get_original("socket", "socket")(fileno=int(inherited))
    else:
        listener = server.bind(conf.host, conf.port)
    app = make_app(lifecycle)
    srv = server.Server(listener, DirectApp(app) if os.environ.get("TEST_DIRECT") else app, conf, lifecycle)
    print(f"PORT {srv.address[1]}", flush=True)
    return server.run([srv], conf, lifecycle)


if __name__ == "__main__":
    sys.exit(main())
