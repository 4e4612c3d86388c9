"""The greenlet switch hook: measures every execution span, and does almost nothing else.

It runs on every greenlet switch of the hub's thread, so it is written in C
(``_accel.Hook``, see ``_accel.c``): one clock read and a few stores per switch, a
dictionary look-up only while requests are being sampled, and a call into Python
(``on_block``) only for spans over the threshold. The same hook as a Python closure
added 564 ns per switch in ``benchmarks/profiler_overhead.py`` (this one: 113-291 ns
in its recorded runs), and a keep-alive request makes two switches.

greenlet calls the hook after the switch, in the target greenlet, with
``(origin, target)``; a hook that raises is removed by greenlet, so ``on_block``
must not raise. Spans of the hub are not measured: the hub also waits for I/O there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import greenlet

from ._accel import Hook

if TYPE_CHECKING:  # types that exist only in _accel.pyi
    from ._accel import _TraceFunc

OnBlock = Callable[[Any, float, float], None]


class AlreadyInstalled(RuntimeError):
    def __init__(self) -> None:
        super().__init__(
            "a tafe profiler is already installed in this thread (after a fork, the parent's carries on in the "
            "child): use that one, or uninstall() it first"
        )


def installed_here() -> bool:
    """Whether a profiler's hook is greenlet's tracer in the calling thread."""
    return isinstance(greenlet.gettrace(), Hook)


class Tracer:
    """Installs the hook in the calling thread, chained to the tracer found there."""

    def __init__(self, hub: Any, threshold_s: float, on_block: OnBlock, sampled: dict[Any, list[float]]) -> None:
        self.hook = Hook(hub, threshold_s, on_block, sampled)
        # current[0] = (start of the running span, greenlet running it): built from one
        # read of the hook under the GIL, so always a consistent pair.
        self.current: Hook = self.hook
        self.previous: _TraceFunc | None = None
        self._threshold = threshold_s
        self._installed = False

    def _configure(self, threshold: float, previous: _TraceFunc | None) -> None:
        self.hook.threshold = threshold
        self.hook.previous = previous
        self.hook.restart(greenlet.getcurrent())

    def install(self, threshold_s: float) -> None:
        previous = greenlet.gettrace()  # may be another profiler's hook: they nest
        self._configure(threshold_s, previous)
        self._threshold = threshold_s
        self.previous = previous
        greenlet.settrace(self.hook)
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
        if greenlet.gettrace() is self.hook:
            greenlet.settrace(self.previous)
            return True
        self._configure(float("inf"), self.previous)
        return False
