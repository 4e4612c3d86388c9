"""The Profiler: ties the tracer hook, the watchdog thread, the aggregate and the outputs.

One per process (per hub thread, to be exact), created by :func:`install` after
monkey-patching, in each pre-forked worker. Nothing here is global: the WSGI
middleware and the debug app are handed the Profiler they report to.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import weakref
from collections.abc import Callable
from time import perf_counter
from typing import Any

import gevent
import greenlet

from .aggregate import OTHER, Aggregate, BlockEvent, RouteSpans
from .outputs import Metrics, RateLimitedLog
from .stacks import dominant, extract, format_stack
from .tracer import AlreadyInstalled, Tracer, installed_here
from .watchdog import Watchdog

RouteOf = Callable[[dict[str, Any]], str]
MAX_PENDING = 1000
FOLD_PERIOD_S = 1.0  # the Prometheus span histogram lags the sampled requests by at most this


def default_route(environ: dict[str, Any]) -> str:
    return environ.get("PATH_INFO") or "/"


class Profiler:
    def __init__(
        self,
        threshold_ms: float = 10,
        sample: float = 0.0,
        *,
        registry: Any = None,
        log: logging.Logger | None | bool = None,
        max_sites: int = 200,
        max_routes: int = 64,
        log_per_second: float = 5.0,
        switch_interval_ms: float | None = 1.0,
    ) -> None:
        if not threshold_ms > 0:
            raise ValueError(f"threshold_ms must be > 0, got {threshold_ms!r}")
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample must be within 0..1, got {sample!r}")
        self.threshold_s = threshold_ms / 1000.0
        self.sample = float(sample)
        self.max_routes = max_routes
        self.switch_interval_s = None if switch_interval_ms is None else switch_interval_ms / 1000.0
        self._saved_switch_interval: float | None = None
        self.hub = gevent.get_hub()
        # Code objects of request frames (the middleware's, or a server's: see
        # ``serves_requests``) -> (name of their environ local, route function or None
        # for their ``route_of`` local): the request a greenlet serves is found on its
        # stack when it blocks (``request_on``), so a request that does not block costs
        # no bookkeeping. greenlet -> span durations of the sampled requests: filled by
        # the middleware and the tracer hook.
        self.request_codes: dict[Any, tuple[str, RouteOf | None]] = {}
        # Source files of those servers: their code runs after the app in the same span,
        # so a sample there names the app's code only if no sample caught the app.
        self.server_files: set[str] = set()
        self.sampled: dict[Any, list[float]] = {}
        # greenlet -> (span start, environ, route function) of a request that ended inside
        # a span already over the threshold: that span is still the request's.
        self.ended: dict[Any, tuple[float, dict[str, Any], RouteOf]] = {}
        self.aggregate = Aggregate(max_sites=max_sites)
        self.route_spans = RouteSpans(max_routes=max_routes)
        self.metrics = Metrics(registry) if registry is not None else None
        logger = logging.getLogger("tafe.profiler") if log is None or log is True else log
        self.log = RateLimitedLog(logger, per_second=log_per_second) if logger else None
        self.listeners: list[Callable[[BlockEvent], None]] = []
        self.errors = 0
        self.installed = False
        self.pid = os.getpid()
        self._ids = itertools.count(1)
        self._pending: list[tuple[BlockEvent, str]] = []
        self._flusher: Any = None
        self._fold_timer: Any = None
        self._fork_hook = False
        self.tracer = Tracer(self.hub, self.threshold_s, self._on_block, self.sampled)
        self.watchdog = Watchdog(self.tracer.current, self.hub, self.threshold_s)
        # True when the running span (not the hub's) is over the threshold: a C call.
        self.span_over: Callable[[], bool] = self.tracer.hook.over

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> Profiler:
        if not self.installed:
            self.tracer.install(self.threshold_s)
            if self.metrics is not None:
                self.metrics.reopen()
            interval = sys.getswitchinterval()
            if self.switch_interval_s is not None and self.switch_interval_s < interval:
                self._saved_switch_interval = interval
                sys.setswitchinterval(self.switch_interval_s)
            self.watchdog.start()
            self._start_folding()
            self.installed = True
            if not self._fork_hook:
                # The watchdog thread does not survive fork(): restart it in the child.
                ref = weakref.ref(self)

                def after_in_child() -> None:
                    profiler = ref()
                    if profiler is not None:
                        profiler._after_fork()

                os.register_at_fork(after_in_child=after_in_child)
                self._fork_hook = True
        return self

    def uninstall(self) -> None:
        """Close the span in progress, restore the previous greenlet tracer, stop the
        watchdog, write what is pending and unregister the metrics."""
        if not self.installed:
            return
        self.close_span()
        self.installed = False
        self.tracer.uninstall()
        self.watchdog.close()
        if self._saved_switch_interval is not None:
            sys.setswitchinterval(self._saved_switch_interval)
            self._saved_switch_interval = None
        self.sampled.clear()
        self._flush()
        if self._fold_timer is not None:
            self._fold_timer.close()
            self._fold_timer = None
        self.fold_metrics()
        if self.metrics is not None:
            self.metrics.close()

    def _after_fork(self) -> None:
        if self.installed:
            self.pid = os.getpid()
            self._pending.clear()
            self._flusher = None
            # The child counts its own sampled spans: its Prometheus values start at zero
            # (a per-process file in multiprocess mode), and the parent folds its own.
            self.route_spans.clear()
            if self.metrics is not None:
                self.metrics.folded.clear()
            self._start_folding()
            self.watchdog.after_fork()

    def close_span(self) -> None:
        """Treat the span in progress as ended now (it has no switch to end it yet)."""
        start, running = self.tracer.current[0]
        me = greenlet.getcurrent()
        span = perf_counter() - start
        if running is me and me is not self.hub and span >= self.threshold_s:
            self._on_block(me, start, span, sys._getframe(1))

    # --- hot path helpers (called from the tracer hook and the middleware) ---------------

    def _on_block(self, origin: Any, start: float, span: float, frame: Any = None) -> None:
        try:
            capture = self.watchdog.capture
            sample, baseline, run = None, None, None
            if capture is not None and capture[0] == start:
                sample, baseline, run = dominant(capture[1], self.server_files), capture[2], capture[3]
            else:  # not sampled: the watchdog's last reading, if taken before the span began
                at, waited = self.watchdog.reading
                baseline = waited if at <= start else None
            now_waited = self.watchdog.runqueue_wait() if baseline is not None else None
            stalled = (now_waited - baseline) / 1e9 if now_waited is not None and baseline is not None else 0.0
            blocked, blocked_at = sample if sample is not None else (None, 0.0)
            if frame is None:
                frame = origin.gr_frame
            yielded = extract(frame) if frame is not None else None
            request = self.request_on(frame)
            ended = self.ended.pop(origin, None)
            if request is None and ended is not None and ended[0] == start:
                request = ended[1:]
            if request is not None:
                environ, route_of = request
                route = self.route_name(environ, route_of)
                request_id = self.request_id(environ)
            else:
                route = "greenlet " + greenlet_name(origin, run)
                request_id = None
            event = BlockEvent(span, time.time(), route, request_id, greenlet_name(origin, run), blocked, yielded, blocked_at, stalled)
            site = self.aggregate.add(event, self.threshold_s)
            for listener in self.listeners:
                listener(event)
            if (self.log is not None or self.metrics is not None) and len(self._pending) < MAX_PENDING:
                self._pending.append((event, site))
                if self._flusher is None and self.installed:
                    # Log handlers and metric locks may wait: never inside the hook.
                    self._flusher = gevent.spawn(self._flush)
        except Exception:
            self.errors += 1

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        self._flusher = None
        for event, site in pending:
            try:
                if self.metrics is not None:
                    self.metrics.count_block(site, event.duration)
                if self.log is not None:
                    self.log.emit(event, site, self.threshold_s)
            except Exception:
                self.errors += 1

    def request_on(self, frame: Any) -> tuple[dict[str, Any], RouteOf] | None:
        """The request whose middleware frame is on the stack ending at ``frame`` (the
        outermost, if middlewares nest): its environ and route function."""
        found = None
        codes = self.request_codes
        while frame is not None:
            if frame.f_code in codes:
                found = frame
            frame = frame.f_back
        if found is None:
            return None
        local = found.f_locals
        environ_local, route_of = codes[found.f_code]
        return local[environ_local], route_of or local["route_of"]

    def serves_requests(self, code: Any, environ_local: str, route_of: RouteOf = default_route) -> None:
        """Attribute spans without the middleware, for a server that calls the app itself:
        each frame running ``code`` serves one request, whose environ is its local
        ``environ_local``. Unsampled requests then cost nothing here; the server must
        call ``finish(environ, route_of)`` when a request ends with ``span_over()`` true
        (a span still running past the threshold stays the request's)."""
        self.request_codes[code] = (environ_local, route_of)
        self.server_files.add(code.co_filename)

    def finish(self, environ: dict[str, Any], route_of: RouteOf, sampled: Any = None) -> None:
        """End of a request (called by the middleware in the greenlet that served it).

        If the span running now is already over the threshold, it still belongs to the
        request when it ends (outside the request's frames). ``sampled``: the greenlet of
        a sampled request, whose spans, with the one still open, are recorded."""
        start, running = self.tracer.current[0]
        span = perf_counter() - start
        me = greenlet.getcurrent()
        if running is me and span >= self.threshold_s:
            self.ended[me] = (start, environ, route_of)
        if sampled is None:
            return
        entry = self.sampled.pop(sampled, None)  # the route's pending list (RouteSpans)
        if entry is None:
            return
        if running is sampled:
            entry.append(span)
        entry[0] += 1

    def _start_folding(self) -> None:
        """When sampling: count the sampled spans and fold them into the span histogram
        every FOLD_PERIOD_S, off the request path (a timer that keeps no loop alive; what
        waits is one period of sampled spans)."""
        if self._fold_timer is not None:
            self._fold_timer.close()
            self._fold_timer = None
        if self.sample > 0:
            self._fold_timer = self.hub.loop.timer(FOLD_PERIOD_S, FOLD_PERIOD_S, ref=False)
            self._fold_timer.start(gevent.spawn_raw, self.fold_metrics)

    def fold_metrics(self) -> None:
        """Count the sampled requests' spans and bring the Prometheus span histogram up
        to date now (it is otherwise up to FOLD_PERIOD_S behind)."""
        try:
            self.route_spans.settle()
            if self.metrics is not None:
                self.metrics.fold(self.route_spans)
        except Exception:
            self.errors += 1

    def route_name(self, environ: dict[str, Any], route_of: RouteOf) -> str:
        try:
            return f"{environ.get('REQUEST_METHOD', '-')} {route_of(environ)}"
        except Exception:
            return OTHER

    def request_id(self, environ: dict[str, Any]) -> str:
        rid = environ.get("tafe.request_id") or environ.get("HTTP_X_REQUEST_ID")
        if not rid:
            rid = environ["tafe.request_id"] = f"{self.pid:x}-{next(self._ids):x}"
        return str(rid)

    # --- reports ---------------------------------------------------------------------------

    def report(self, top: int = 20) -> dict[str, Any]:
        """The top offending code sites (what ``/debug/blocking`` serves), plus the spans
        of sampled requests per route."""
        out = self.aggregate.report(top)
        out.update(
            pid=self.pid,
            installed=self.installed,
            threshold_ms=self.threshold_s * 1000,
            sample=self.sample,
            ongoing=self.ongoing(),
            sampled_routes=self.route_spans.report(),
            watchdog={
                "wakeups": self.watchdog.wakeups,
                "realtime": self.watchdog.realtime,
                "cpu_s": self.watchdog.cpu_seconds(),
            },
            errors=self.errors,
        )
        return out

    def ongoing(self) -> dict[str, Any] | None:
        """The span holding the loop right now, if over the threshold (seen from another
        thread, e.g. a debug endpoint served by a thread, or a log after a hang)."""
        start, running = self.tracer.current[0]
        capture = self.watchdog.capture
        age = perf_counter() - start
        if running is self.hub or running is greenlet.getcurrent() or age < self.threshold_s:
            return None
        stack = capture[1][-1][0] if capture is not None and capture[0] == start else ()
        return {"age_ms": round(age * 1000, 3), "greenlet": greenlet_name(running), "stack": format_stack(stack)}

    def collapsed(self) -> str:
        """Collapsed stacks (``route;frame;...;frame ms``) for speedscope or flamegraph.pl."""
        return self.aggregate.collapsed()

    def report_text(self, top: int = 20) -> str:
        from .wsgi import render_text

        return render_text(self.report(top))


def greenlet_name(g: Any, run: Any = None) -> str:
    """The function ``g`` runs (``run``: as seen while it ran, if it has ended since)."""
    if g is None:
        return "?"
    live = getattr(g, "_run", None) or getattr(g, "run", None)
    if live is not None and getattr(live, "__self__", None) is not g:
        run = live
    if run is None:  # no function: a finished gevent Greenlet (its _run is its own method)
        return "main" if getattr(g, "parent", 0) is None else type(g).__name__
    name = getattr(run, "__qualname__", None) or type(run).__name__
    module = getattr(run, "__module__", None)
    return f"{module}.{name}" if module else name


def install(
    threshold_ms: float = 10,
    sample: float = 0.0,
    *,
    registry: Any = None,
    log: logging.Logger | None | bool = None,
    max_sites: int = 200,
    max_routes: int = 64,
    log_per_second: float = 5.0,
    switch_interval_ms: float | None = 1.0,
) -> Profiler:
    """Start profiling the calling thread's hub, once: in each worker of a pre-forking
    server (gunicorn's ``post_fork`` will do, before or after monkey-patching), or once
    before it forks (a forked child keeps its parent's profiler running). Raises
    ``RuntimeError`` if one is installed already; ``Profiler(...).start()`` nests one in
    it instead (as ``no_blocking`` does).

    ``registry``: a prometheus_client CollectorRegistry for the metrics, or None.
    ``max_sites``: code sites tracked (more fall into ``(other)``); ``max_routes``:
    routes whose sampled spans are tracked.
    ``log``: the logger for one JSON line per blocking event (default ``tafe.profiler``),
    or False for none. ``switch_interval_ms``: lower the interpreter's GIL switch
    interval to this while installed (so the watchdog samples pure-Python blockers
    promptly); None leaves it alone.
    """
    if installed_here():  # before the new one registers its metrics
        raise AlreadyInstalled()
    return Profiler(
        threshold_ms,
        sample,
        registry=registry,
        log=log,
        max_sites=max_sites,
        max_routes=max_routes,
        log_per_second=log_per_second,
        switch_interval_ms=switch_interval_ms,
    ).start()
