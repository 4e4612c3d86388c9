"""WSGI glue: the middleware that tells the profiler which request a greenlet serves,
and the debug app serving ``/debug/blocking``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any
from urllib.parse import parse_qs

from greenlet import getcurrent

from .aggregate import OTHER
from .profiler import Profiler, RouteOf, default_route

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def middleware(app: WSGIApp, profiler: Profiler, route: RouteOf | None = None) -> WSGIApp:
    """Wrap ``app`` so spans are attributed to the request the greenlet serves.

    ``route(environ) -> str`` names the route (default: PATH_INFO); keep it low in
    cardinality, it becomes a metric label (capped by the profiler). The request id is
    ``environ["tafe.request_id"]``, else the X-Request-Id header, else generated.

    A request that is not sampled costs one frame, a clock read and a comparison: the
    profiler finds the request of a greenlet that blocked by looking for this frame on
    its stack (``Profiler.request_on``), and the check at the end keeps a span that
    outlives the request, already too long, attributed to it.
    """
    route_of = route or default_route
    ended, sampled = profiler.ended, profiler.sampled
    current, threshold, clock = profiler.tracer.current, profiler.threshold_s, perf_counter
    rate, draw, finish = profiler.sample, random.random, profiler.finish
    route_spans = profiler.route_spans
    pending = route_spans.pending

    def profiled(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if rate and (rate >= 1.0 or draw() < rate) and profiler.installed:
            return recorded(environ, start_response)
        try:
            result = app(environ, start_response)
        except BaseException:
            finish(environ, route_of)
            raise
        if type(result) is not list:
            return _Closing(result, environ, route_of, finish)
        # A list stays as is (servers set Content-Length from a one-item list) and the
        # request ends now; the common case, inlined (this runs on every request).
        start, running = current[0]
        if clock() - start >= threshold and running is getcurrent():
            ended[running] = (start, environ, route_of)
        return result

    def recorded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """A sampled request: the tracer hook appends its spans to its route's pending list."""
        g = getcurrent()
        if g in sampled or not profiler.installed:  # nested: the outer middleware records it
            return app(environ, start_response)
        try:
            key = (environ.get("REQUEST_METHOD", "-"), route(environ) if route else environ.get("PATH_INFO") or "/")
        except Exception:
            key = ("-", OTHER)
        entry = sampled[g] = pending.get(key) or route_spans.entry(key)
        try:
            result = app(environ, start_response)
        except BaseException:
            finish(environ, route_of, g)
            raise
        if type(result) is not list:
            return _Closing(result, environ, route_of, finish, g)
        # Profiler.finish, inlined: this runs on every sampled request.
        del sampled[g]
        start, running = current[0]
        if running is g:
            span = clock() - start
            entry.append(span)
            if span >= threshold:
                ended[g] = (start, environ, route_of)
        entry[0] += 1
        return result

    profiler.request_codes.update(
        {profiled.__code__: ("environ", None), recorded.__code__: ("environ", None), _Closing.__iter__.__code__: ("environ", None)}
    )
    return recorded if rate >= 1.0 else profiled  # every request sampled: no draw, no hop


class _Closing:
    """The app's iterable, ending the request's attribution when the server closes it.

    The server iterates it after the middleware has returned: ``__iter__``'s frame
    stands for the request meanwhile (a request frame for ``Profiler.request_on``), so
    a body generator that blocks between chunks is still the request's."""

    __slots__ = ("_result", "_environ", "_route_of", "_finish", "_sampled")

    def __init__(
        self, result: Iterable[bytes], environ: dict[str, Any], route_of: RouteOf, finish: Callable[..., None], sampled: Any = None
    ) -> None:
        self._result = result
        self._environ = environ
        self._route_of = route_of
        self._finish = finish  # Profiler.finish
        self._sampled = sampled  # the greenlet of a sampled request

    def __iter__(self) -> Any:
        environ, route_of = self._environ, self._route_of  # noqa: F841 - read from this frame
        yield from self._result

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._finish(self._environ, self._route_of, self._sampled)


def debug_app(profiler: Profiler) -> WSGIApp:
    """``/debug/blocking``: top offenders as JSON (``?format=text`` plain text, ``?top=N``);
    ``/debug/blocking/collapsed``: collapsed stacks. Works mounted (SCRIPT_NAME) or not."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).rstrip("/")
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            return _respond(start_response, "405 Method Not Allowed", "text/plain", b"GET only\n", (("Allow", "GET, HEAD"),))
        query = parse_qs(environ.get("QUERY_STRING", ""))
        try:
            top = max(1, min(1000, int(query.get("top", ["20"])[0])))
        except ValueError:
            return _respond(start_response, "400 Bad Request", "text/plain", b"top must be an integer\n")
        if path.endswith("/collapsed"):
            return _respond(start_response, "200 OK", "text/plain; charset=utf-8", profiler.collapsed().encode())
        if path in ("", "/debug/blocking") or path.endswith("/debug/blocking"):
            if query.get("format", ["json"])[0] == "text":
                return _respond(start_response, "200 OK", "text/plain; charset=utf-8", profiler.report_text(top).encode())
            body = json.dumps(profiler.report(top), indent=1).encode()
            return _respond(start_response, "200 OK", "application/json", body)
        return _respond(start_response, "404 Not Found", "text/plain", b"not found\n")

    return app


def _respond(start_response: Callable[..., Any], status: str, ctype: str, body: bytes, extra: tuple[tuple[str, str], ...] = ()) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", "no-store"), *extra])
    return [body]


def render_text(report: dict[str, Any]) -> str:
    lines = [
        f"pid {report['pid']}: {report['events']} spans over {report['threshold_ms']:g} ms "
        f"(sites tracked: {report['sites_tracked']}, sampling {report['sample']:g})",
    ]
    if report.get("ongoing"):
        ongoing = report["ongoing"]
        lines.append(f"NOW BLOCKED for {ongoing['age_ms']} ms in {ongoing['greenlet']}:")
        lines.extend("    " + f for f in ongoing["stack"])
    for rank, site in enumerate(report["top"], 1):
        lines.append("")
        lines.append(
            f"#{rank} {site['site']}  count={site['count']} total={site['total_ms']:.1f}ms "
            f"p50={site['p50_ms']:.1f}ms p99={site['p99_ms']:.1f}ms max={site['max_ms']:.1f}ms"
        )
        lines.append("    routes: " + ", ".join(f"{r} x{n}" for r, n in site["routes"].items()))
        example = site["example"]
        if example:
            lines.append(f"    longest: {example['route']} request_id={example['request_id']} {example['duration_ms']} ms")
            lines.append(f"    stack ({example['captured'].replace('_', ' ')}):")
            stack = example["blocked_stack"] or example["yield_stack"]
            lines.extend("      " + f for f in stack[-12:])
            if example["blocked_stack"] and example["yield_site"]:
                lines.append("    then yielded at: " + example["yield_site"])
    if report.get("sampled_routes"):
        lines.append("")
        lines.append("sampled requests, per route (spans per request, loop time per request, span p50/p99/max ms):")
        for route, s in report["sampled_routes"].items():
            lines.append(
                f"    {route}: {s['requests']} req, {s['spans_per_request']} spans/req, {s['loop_ms_per_request']} ms/req, "
                f"{s['span_p50_ms']}/{s['span_p99_ms']}/{s['span_max_ms']}"
            )
    return "\n".join(lines) + "\n"
