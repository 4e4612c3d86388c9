"""A real OS thread that takes the stack of a greenlet while it still blocks the loop.

When the running span passes the threshold, the hub's thread is by definition not
running the loop, so the only way to see *what* it is doing is from another thread:
``sys._current_frames()[hub thread]``. The thread is started and paused with gevent's
saved originals (``get_original``), so monkey-patching does not turn it into a greenlet.

It wakes about once per threshold while spans are short, and at ``start + threshold``
for the span in progress, so a span is caught as soon as it crosses the threshold
(plus, for pure-Python code, up to the interpreter's GIL switch interval).
"""

from __future__ import annotations

import sys
from time import perf_counter
from typing import Any

from gevent.monkey import get_original

from .stacks import Stack, extract, is_profiler

_start_new_thread = get_original("_thread", "start_new_thread")
_get_ident = get_original("_thread", "get_ident")
_sleep = get_original("time", "sleep")


class Watchdog:
    def __init__(self, current: list[tuple[float, Any]], hub: Any, threshold_s: float) -> None:
        self.current = current
        self.hub = hub
        self.threshold = threshold_s
        self.period = max(threshold_s / 2, 0.001)
        self.thread_id = _get_ident()  # the hub's thread: the caller's
        # (span start, stack) of the last span caught over the threshold.
        self.capture: tuple[float, Stack] | None = None
        self.wakeups = 0
        self._generation = 0

    def start(self) -> None:
        self._generation += 1
        _start_new_thread(self._run, (self._generation,))

    def stop(self) -> None:
        self._generation += 1  # the running thread sees it changed and ends

    def _run(self, generation: int) -> None:
        caught = None
        while generation == self._generation:
            self.wakeups += 1
            start, running = self.current[0]
            if running is self.hub or start == caught:
                _sleep(self.period)
                continue
            age = perf_counter() - start
            if age < self.threshold:
                _sleep(self.threshold - age + 0.0002)
                continue
            caught = start
            frame = sys._current_frames().get(self.thread_id)
            stack = extract(frame)
            # Keep it only if that span is still the one running and we did not catch the
            # thread inside the tracer hook (which runs in the *next* greenlet).
            if self.current[0][0] == start and stack and not is_profiler(stack[-1][0]):
                self.capture = (start, stack)
            del frame
            _sleep(self.period)
