"""Fail a test when the code under it holds the event loop too long.

``with no_blocking(limit_ms): ...`` raises :class:`BlockingSpanError` with the offending
stack (taken while blocked when the span lasted long enough for the watchdog to see it)
if any span inside exceeds ``limit_ms`` (not counting, on Linux, time the thread spent
waiting for a CPU: an overloaded test host does not fail the test). The ``no_blocking_spans`` pytest fixture does
the same around a whole test; ``@pytest.mark.block_limit_ms(N)`` sets its limit
(default 10 ms). Load this module as a plugin (``pytest_plugins = ["tafe.profiler.testing"]``
in the top conftest.py, or ``-p tafe.profiler.testing``) to fail the test itself; merely
importing the fixture into a conftest.py fails the test's teardown instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any

from .aggregate import BlockEvent
from .profiler import Profiler


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

    def __enter__(self) -> no_blocking:
        # Started directly, not with install(): it nests in a profiler already there.
        self.profiler = Profiler(threshold_ms=self.limit_ms, log=False).start()
        self.profiler.listeners.append(self._on_event)
        return self

    def _on_event(self, event: BlockEvent) -> None:
        # A span long only because the host gave the thread no CPU is not the code's fault.
        if event.duration - event.runqueue >= self.limit_ms / 1000:
            self.events.append(event)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.check()
        elif self.profiler is not None:
            self.profiler.uninstall()

    def restart(self) -> None:
        """Forget what was seen so far, the span in progress included."""
        assert self.profiler is not None
        self.profiler.tracer.restart_span()
        self.events.clear()

    def check(self) -> None:
        """Stop profiling; raise BlockingSpanError if a span went over the limit."""
        assert self.profiler is not None
        self.profiler.uninstall()
        events, self.events = self.events, []
        if events:
            raise BlockingSpanError(self.limit_ms, events)


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

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(item: Any) -> Any:
        """With this module as a plugin, only the test function's own spans count (not
        pytest's set-up work), and the check fails the test itself (not its teardown)."""
        guard = getattr(item, "funcargs", {}).get("no_blocking_spans")
        if isinstance(guard, no_blocking):
            guard.restart()
        result = yield
        if isinstance(guard, no_blocking):
            guard.check()
        return result

    def pytest_configure(config: Any) -> None:
        config.addinivalue_line("markers", "block_limit_ms(ms): span limit of the no_blocking_spans fixture")
