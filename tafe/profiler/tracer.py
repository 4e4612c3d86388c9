"""The greenlet switch hook: measures every execution span, and does almost nothing else.

It runs on every greenlet switch of the hub's thread, so it is a closure over local
cells (cheaper than attribute look-ups) doing one clock read, one comparison, and a
dictionary look-up only while requests are being sampled. Anything slower happens in
``on_block``, called only for spans over the threshold.

greenlet calls the hook after the switch, in the target greenlet, with
``(origin, target)``; a hook that raises is removed by greenlet, so ``on_block``
must not raise. Spans of the hub are not measured: the hub also waits for I/O there.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable

import greenlet

OnBlock = Callable[[Any, float, float], None]


class Tracer:
    """Installs the hook in the calling thread, chained to the tracer found there."""

    def __init__(self, hub: Any, threshold_s: float, on_block: OnBlock, sampled: dict[Any, list[float]]) -> None:
        # current[0] = (start of the running span, greenlet running it): one tuple, so
        # the watchdog thread always reads a consistent pair.
        self.current: list[tuple[float, Any]] = [(perf_counter(), greenlet.getcurrent())]
        self.previous: Any = None
        self._installed = False
        self._hook, self._configure = self._make_hook(hub, threshold_s, on_block, sampled)

    def _make_hook(
        self, hub: Any, threshold: float, on_block: OnBlock, sampled: dict[Any, list[float]]
    ) -> tuple[Callable[[str, tuple[Any, Any]], None], Callable[..., None]]:
        clock = perf_counter
        current = self.current
        last = current[0][0]
        previous = None

        def hook(event: str, args: tuple[Any, Any]) -> None:
            nonlocal last
            now = clock()
            start = last  # exactly the value the watchdog saw in current[0]
            last = now
            span = now - start
            origin, target = args
            current[0] = (now, target)
            if origin is not hub:
                if span >= threshold:
                    on_block(origin, start, span)
                if sampled:
                    spans = sampled.get(origin)
                    if spans is not None:
                        spans.append(span)
            if previous is not None:
                previous(event, args)

        def configure(new_threshold: float, new_previous: Any = None) -> None:
            nonlocal threshold, previous, last
            threshold = new_threshold
            previous = new_previous
            last = clock()
            current[0] = (last, greenlet.getcurrent())

        return hook, configure

    def install(self, threshold_s: float) -> None:
        previous = greenlet.gettrace()
        self._configure(threshold_s, previous)
        self._threshold = threshold_s
        self.previous = previous
        greenlet.settrace(self._hook)
        self._installed = True

    def restart_span(self) -> None:
        """Start the running span anew (what ran before is not to be counted)."""
        if self._installed:
            self._configure(self._threshold, self.previous)

    def uninstall(self) -> bool:
        """Restore the previous hook; if another hook was chained on top of ours since,
        leave ours in its chain as a cheap pass-through and return False."""
        if not self._installed:
            return True
        self._installed = False
        if greenlet.gettrace() is self._hook:
            greenlet.settrace(self.previous)
            return True
        self._configure(float("inf"), self.previous)
        return False
