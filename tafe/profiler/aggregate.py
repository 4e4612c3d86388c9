"""Blocking events aggregated by code site, in memory bounded whatever the traffic.

A site is the innermost application frame of the stack taken while the loop was
blocked (or, when the watchdog could not take one, at the yield; ``(not sampled)`` if
that one shows no application code either). Per site we keep a
count, total and max duration, fixed log-bucket quantiles, the routes it hurt, one
example request and its distinct full stacks; every collection has a cap, and what
falls beyond a cap is counted in an ``(other)`` entry instead of growing memory.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

from .stacks import Frame, Stack, app_frame, collapsed_frame, format_frame, format_stack, is_library

OTHER = "(other)"
NOT_SAMPLED = "(not sampled)"  # a long span with no stack that names application code


class LogBuckets:
    """Fixed log-spaced buckets (5% wide): quantiles within 5%, memory bounded by range."""

    __slots__ = ("counts",)
    BASE = 1e-5  # seconds; anything shorter lands in bucket 0
    LOG_FACTOR = math.log(1.05)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, seconds: float) -> None:
        i = int(math.log(seconds / self.BASE) / self.LOG_FACTOR) + 1 if seconds > self.BASE else 0
        self.counts[i] = self.counts.get(i, 0) + 1

    def quantile(self, q: float) -> float:
        total = sum(self.counts.values())
        if not total:
            return 0.0
        rank = q * total
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                # Geometric middle of the bucket.
                return self.BASE * math.exp((i - 0.5) * self.LOG_FACTOR) if i else self.BASE
        return 0.0  # pragma: no cover


@dataclass(slots=True)
class BlockEvent:
    """One span that held the event loop longer than the threshold."""

    duration: float  # seconds, from the switch in to the switch out
    wall_time: float  # time.time() at the end of the span
    route: str  # "METHOD /route" of the request served, or "greenlet <function>"
    request_id: str | None
    greenlet: str
    blocked: Stack | None  # taken by the watchdog while the loop was still blocked
    yielded: Stack | None  # taken when the greenlet finally switched away
    blocked_at: float = 0.0  # seconds into the span when ``blocked`` was taken
    runqueue: float = 0.0  # seconds of the span the thread waited for a CPU (as far as seen)

    @property
    def stack(self) -> Stack:
        return self.blocked or self.yielded or ()

    def to_dict(self) -> dict[str, Any]:
        site = app_frame(self.stack)
        return {
            "event": "eventloop_blocked",
            "duration_ms": round(self.duration * 1000, 3),
            "time": self.wall_time,
            "route": self.route,
            "request_id": self.request_id,
            "greenlet": self.greenlet,
            "site": format_frame(site) if site else None,
            "captured": "while_blocked" if self.blocked else "at_yield",
            "blocked_stack_at_ms": round(self.blocked_at * 1000, 3) if self.blocked else None,
            "runqueue_wait_ms": round(self.runqueue * 1000, 3),
            "yield_site": format_frame(y) if (y := app_frame(self.yielded or ())) else None,
            "blocked_stack": format_stack(self.blocked or ()),
            "yield_stack": format_stack(self.yielded or ()),
        }


class Site:
    __slots__ = ("frame", "count", "while_blocked", "os_stalled", "total", "max", "buckets", "routes", "stacks", "example", "last_seen")

    def __init__(self, frame: Frame | None) -> None:
        self.frame = frame
        self.count = 0
        self.while_blocked = 0  # events whose stack the watchdog took during the block
        self.os_stalled = 0  # events long only because the thread waited for a CPU
        self.total = 0.0
        self.max = 0.0
        self.buckets = LogBuckets()
        self.routes: dict[str, int] = {}
        self.stacks: dict[tuple[str, Stack], list[float]] = {}  # (route, stack) -> [count, seconds]
        self.example: dict[str, Any] | None = None
        self.last_seen = 0.0


class Aggregate:
    def __init__(self, max_sites: int = 200, max_routes: int = 32, max_stacks: int = 16) -> None:
        self.max_sites = max_sites
        self.max_routes = max_routes
        self.max_stacks = max_stacks
        self.sites: dict[Frame | str, Site] = {}
        self.events = 0
        self.started = time.time()
        self.os_stalled = 0

    def site_key(self, event: BlockEvent) -> Frame | str:
        frame = app_frame(event.stack)
        key: Frame | str = frame if frame is not None else NOT_SAMPLED
        if event.blocked is None and frame is not None and is_library(frame[0]):
            # Not sampled while blocked (a span just over the threshold may end before
            # the watchdog looks), and the stack at yield shows no application code:
            # not a culprit to name (gevent's socket code, the server's loop).
            key = NOT_SAMPLED
        if key not in self.sites and len(self.sites) >= self.max_sites:
            return OTHER
        return key

    def add(self, event: BlockEvent, threshold: float = 0.0) -> str:
        """Record the event; return the site's name (bounded set: used as a metric label).

        An event is also counted as *OS-stalled* when, without the time its thread spent
        waiting for a CPU, it would have stayed under the threshold: on an overloaded
        host the loop stalls in code that does not block by itself."""
        self.events += 1
        stalled = event.duration - event.runqueue < threshold
        self.os_stalled += stalled
        key = self.site_key(event)
        site = self.sites.get(key)
        if site is None:
            site = self.sites[key] = Site(key if isinstance(key, tuple) else None)
        d = event.duration
        site.count += 1
        site.while_blocked += event.blocked is not None
        site.os_stalled += stalled
        site.total += d
        site.buckets.add(d)
        site.last_seen = event.wall_time
        if d >= site.max:
            site.max = d
            site.example = event.to_dict()
        route = event.route if event.route in site.routes or len(site.routes) < self.max_routes else OTHER
        site.routes[route] = site.routes.get(route, 0) + 1
        skey = (route, event.stack)
        if skey not in site.stacks and len(site.stacks) >= self.max_stacks:
            skey = (OTHER, (("(other stacks)", 0, "(other stacks)"),))
        entry = site.stacks.setdefault(skey, [0, 0.0])
        entry[0] += 1
        entry[1] += d
        return site_name(key)

    def report(self, top: int = 20) -> dict[str, Any]:
        sites = sorted(self.sites.items(), key=lambda kv: kv[1].total, reverse=True)
        return {
            "since": self.started,
            "events": self.events,
            "sites_tracked": len(self.sites),
            "os_stalled": self.os_stalled,
            "top": [
                {
                    "site": site_name(key),
                    "count": s.count,
                    "while_blocked": s.while_blocked,
                    "os_stalled": s.os_stalled,
                    "total_ms": round(s.total * 1000, 3),
                    "p50_ms": round(min(s.buckets.quantile(0.5), s.max) * 1000, 3),
                    "p99_ms": round(min(s.buckets.quantile(0.99), s.max) * 1000, 3),
                    "max_ms": round(s.max * 1000, 3),
                    "last_seen": s.last_seen,
                    "routes": dict(sorted(s.routes.items(), key=lambda kv: -kv[1])),
                    "example": s.example,
                }
                for key, s in sites[:top]
            ],
        }

    def collapsed(self) -> str:
        """``route;outer;...;inner weight`` lines, weight in milliseconds blocked (>= 1)."""
        lines = []
        for site in self.sites.values():
            for (route, stack), (_, seconds) in site.stacks.items():
                frames = [route.replace(";", ":").replace(" ", "_")] + [collapsed_frame(f) for f in stack]
                lines.append(f"{';'.join(frames)} {max(1, round(seconds * 1000))}")
        return "\n".join(sorted(lines)) + ("\n" if lines else "")


def site_name(key: Frame | str) -> str:
    return format_frame(key) if isinstance(key, tuple) else key


# Spans worth telling apart run from ~0.1 ms (a bid) to ~100 ms (a stall): the buckets of
# the Prometheus span histogram.
SPAN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 1.0)
# Fine bounds for the sampled spans: 5% apart from 10 us to ~100 s, plus every
# SPAN_BUCKETS bound, so each fine bucket lies inside one Prometheus bucket: both views
# come from the same counts.
FINE_BOUNDS = tuple(sorted({round(LogBuckets.BASE * 1.05**i, 12) for i in range(331)} | set(SPAN_BUCKETS)))
# Prometheus bucket k (then +Inf) holds the fine buckets FINE_SLICES[k][0] <= i < FINE_SLICES[k][1].
_ends = [bisect_left(FINE_BOUNDS, b) + 1 for b in SPAN_BUCKETS] + [len(FINE_BOUNDS) + 1]
FINE_SLICES = tuple(zip([0] + _ends[:-1], _ends))


class RouteStat:
    """One route's sampled spans, in plain numbers (no lock, no Prometheus call)."""

    __slots__ = ("requests", "spans", "seconds", "max", "counts")

    def __init__(self) -> None:
        self.requests = 0
        self.spans = 0
        self.seconds = 0.0
        self.max = 0.0
        self.counts = [0] * (len(FINE_BOUNDS) + 1)  # per FINE_BOUNDS bound, then beyond

    def quantile(self, q: float) -> float:
        rank, seen = q * self.spans, 0
        for i, n in enumerate(self.counts):
            seen += n
            if n and seen >= rank:
                if i == 0 or i == len(FINE_BOUNDS):
                    return FINE_BOUNDS[min(i, len(FINE_BOUNDS) - 1)]
                return math.sqrt(FINE_BOUNDS[i - 1] * FINE_BOUNDS[i])  # the bucket's geometric middle
        return 0.0

    def histogram(self) -> list[int]:
        """Span counts per SPAN_BUCKETS bound, then +Inf (not cumulative)."""
        counts = self.counts
        return [sum(counts[a:b]) for a, b in FINE_SLICES]


class RouteSpans:
    """Every span of the sampled requests, per route: how long a request holds the loop.

    On the request path only lists are appended to: ``pending[(method, route)]`` is
    ``[requests, span, span, ...]``, the tracer hook appending a sampled request's spans
    to its route's list and the middleware counting the request. ``settle`` (at most
    once a second, and before any report) sorts what is pending and counts it into the
    buckets: a bisect per span on the request path cost more than the rest of sampling,
    and so did keeping a list per request alive until then (garbage collector work)."""

    __slots__ = ("max_routes", "routes", "pending")

    def __init__(self, max_routes: int = 64) -> None:
        self.max_routes = max_routes
        self.routes: dict[str, RouteStat] = {}
        self.pending: dict[tuple[str, str], list[Any]] = {}

    def entry(self, key: tuple[str, str]) -> list[Any]:
        """The pending list of a route seen for the first time since the last settle."""
        if len(self.pending) >= 4 * self.max_routes:  # many routes: count what is pending now
            self.settle()
            self.pending.clear()  # requests in flight on these routes are not counted
        return self.pending.setdefault(key, [0])

    def settle(self) -> None:
        """Count the pending spans into their routes' statistics."""
        for (method, name), entry in list(self.pending.items()):
            requests, spans = entry[0], entry[1:]
            if not requests and not spans:
                continue
            entry[0] = 0  # emptied in place: requests in flight hold the list
            del entry[1:]
            route = f"{method} {name}"
            stat = self.routes.get(route)
            if stat is None:
                if len(self.routes) >= self.max_routes:
                    route = OTHER
                stat = self.routes.get(route)
                if stat is None:
                    stat = self.routes[route] = RouteStat()
            stat.requests += requests
            if not spans:
                continue
            spans.sort()
            stat.spans += len(spans)
            stat.seconds += sum(spans)
            stat.max = max(stat.max, spans[-1])
            # Bucket i holds FINE_BOUNDS[i - 1] < d <= FINE_BOUNDS[i]: walk the sorted spans.
            counts, lo, n = stat.counts, 0, len(spans)
            for i, bound in enumerate(FINE_BOUNDS):
                hi = bisect_right(spans, bound, lo)
                counts[i] += hi - lo
                lo = hi
                if lo == n:
                    break
            counts[-1] += n - lo

    def clear(self) -> None:
        self.routes.clear()
        self.pending.clear()

    def report(self) -> dict[str, Any]:
        self.settle()
        out = {}
        for route, s in sorted(self.routes.items()):
            out[route] = {
                "requests": s.requests,
                "spans": s.spans,
                "spans_per_request": round(s.spans / max(s.requests, 1), 2),
                "loop_ms_per_request": round(s.seconds * 1000 / max(s.requests, 1), 4),
                "span_p50_ms": round(min(s.quantile(0.5), s.max) * 1000, 4),
                "span_p99_ms": round(min(s.quantile(0.99), s.max) * 1000, 4),
                "span_max_ms": round(s.max * 1000, 4),
            }
        return out
