"""Which request a blocking span is attributed to: the profiler finds the middleware's
frame on the greenlet's stack (no per-request bookkeeping), and a span that outlives its
request, already too long when the request ended, stays the request's."""

from __future__ import annotations

import time

import gevent
import pytest

from tafe import profiler


def block(seconds: float) -> None:
    time.sleep(seconds)  # not monkey-patched here: blocks the loop


@pytest.fixture
def events():
    prof = profiler.install(threshold_ms=10, log=False)
    seen: list = []
    prof.listeners.append(seen.append)
    yield prof, seen
    prof.uninstall()


def serve(app, environ: dict) -> None:
    gevent.spawn(app, environ, lambda *a: None).join()
    gevent.sleep(0.01)


def test_span_ending_inside_the_request(events) -> None:
    prof, seen = events

    def app(environ, start_response):
        block(0.025)
        gevent.sleep(0)  # the span ends here, inside the request
        return [b"ok"]

    serve(profiler.middleware(app, prof), {"REQUEST_METHOD": "GET", "PATH_INFO": "/inside", "HTTP_X_REQUEST_ID": "r-1"})
    mine = [e for e in seen if e.route == "GET /inside"]
    assert len(mine) == 1 and mine[0].request_id == "r-1" and mine[0].duration >= 0.024, seen


def test_span_ending_after_the_request(events) -> None:
    prof, seen = events

    def app(environ, start_response):
        block(0.025)
        return [b"ok"]  # no switch before the request ends: the span ends later

    def server(environ, start_response):  # what a server does after the app returns
        result = profiler.middleware(app, prof, route=lambda e: "/after")(environ, start_response)
        gevent.sleep(0)
        return result

    serve(server, {"REQUEST_METHOD": "POST", "PATH_INFO": "/x", "HTTP_X_REQUEST_ID": "r-2"})
    mine = [e for e in seen if e.route == "POST /after"]
    assert len(mine) == 1 and mine[0].request_id == "r-2", seen


def test_nested_middlewares_name_the_outer_route_and_other_greenlets_their_function(events) -> None:
    prof, seen = events

    def app(environ, start_response):
        block(0.025)
        gevent.sleep(0)
        return [b"ok"]

    inner = profiler.middleware(app, prof, route=lambda e: "/inner")
    outer = profiler.middleware(inner, prof, route=lambda e: "/outer")
    serve(outer, {"REQUEST_METHOD": "GET", "PATH_INFO": "/x"})

    def worker() -> None:
        block(0.025)
        gevent.sleep(0)

    gevent.spawn(worker).join()
    gevent.sleep(0.01)
    routes = {e.route for e in seen}
    assert "GET /outer" in routes and "GET /inner" not in routes, routes
    assert any(r.startswith("greenlet ") and r.endswith("worker") for r in routes), routes


def test_block_in_a_streamed_body_between_two_yields(events) -> None:
    prof, seen = events

    def body():
        yield b"a"
        gevent.sleep(0)
        block(0.025)
        gevent.sleep(0)  # the span ends here, while the server iterates the body
        yield b"b"

    def server(environ, start_response):  # the server iterates after the app returned
        result = profiler.middleware(lambda e, s: body(), prof)(environ, start_response)
        chunks = list(result)
        result.close()
        return chunks

    serve(server, {"REQUEST_METHOD": "GET", "PATH_INFO": "/stream", "HTTP_X_REQUEST_ID": "r-3"})
    mine = [e for e in seen if e.duration >= 0.024]
    assert [(e.route, e.request_id) for e in mine] == [("GET /stream", "r-3")], seen


def a_job_that_ends_blocking() -> None:
    block(0.025)


def test_a_greenlet_that_blocks_as_it_ends_is_named_by_its_function(events) -> None:
    # gevent forgets a Greenlet's function when it ends, before the switch that ends
    # the span: the name is the one the watchdog saw while it blocked.
    prof, seen = events
    gevent.spawn(a_job_that_ends_blocking).join()
    gevent.sleep(0.01)
    name = f"{__name__}.a_job_that_ends_blocking"
    assert [(e.route, e.greenlet) for e in seen] == [("greenlet " + name, name)], seen
