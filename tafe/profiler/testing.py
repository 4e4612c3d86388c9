"""Fail a test when the code under it holds the event loop too long.

``with no_blocking(limit_ms): ...`` raises :class:`BlockingSpanError` with the offending
stack (taken while blocked when the span lasted long enough for the watchdog to see it)
if any span inside exceeds ``limit_ms``. The ``no_blocking_spans`` pytest fixture does
the same around a whole test; ``@pytest.mark.block_limit_ms(N)`` sets its limit
(default 10 ms). Import the fixture into a conftest.py to use it.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Iterator

from .aggregate import BlockEvent
from .profiler import Profiler, install


class BlockingSpanError(AssertionError):
    def __init__(self, limit_ms: float, events: list[BlockEvent]) -> None:
        self.events = events
        worst = max(events, key=lambda e: e.duration)
        d = worst.to_dict()
        stack = d["blocked_stack"] or d["yield_stack"]
        lines = [
            f"{len(events)} span(s) held the event loop over {limit_ms:g} ms; the longest, "
            f"{d['duration_ms']:.1f} ms in {d['route']}, at {d['site']} (stack {d['captured'].replace('_', ' ')}):"
        ]
        lines += ["    " + frame for frame in stack]
        super().__init__("\n".join(lines))


class no_blocking:
    """Context manager: profile the block with a ``limit_ms`` threshold, fail on any span over it."""

    def __init__(self, limit_ms: float = 10.0) -> None:
        self.limit_ms = limit_ms
        self.events: list[BlockEvent] = []
        self.profiler: Profiler | None = None

    def __enter__(self) -> "no_blocking":
        self.profiler = install(threshold_ms=self.limit_ms, log=False)
        self.profiler.listeners.append(self.events.append)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self.profiler is not None
        self.profiler.uninstall()
        if kind is None and self.events:
            raise BlockingSpanError(self.limit_ms, self.events)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixture
    pass
else:

    @pytest.fixture
    def no_blocking_spans(request: Any) -> Iterator[no_blocking]:
        marker = request.node.get_closest_marker("block_limit_ms")
        with no_blocking(float(marker.args[0]) if marker else 10.0) as guard:
            yield guard
