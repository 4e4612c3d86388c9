"""A real OS thread that takes the stack of a greenlet while it still blocks the loop.

When the running span passes the threshold, the hub's thread is by definition not
running the loop, so the only way to see *what* it is doing is from another thread:
``sys._current_frames()[hub thread]``. The thread is a POSIX thread made in C, so
monkey-patching does not turn it into a greenlet.

While spans are short it wakes once per threshold (and, finding a span already a tenth
of the threshold old, again when it is half the threshold old); a span it finds older
than half the threshold is then sampled every half threshold (the interval doubling whenever the
span's 16 samples are thinned to 8, so memory stays bounded and samples stay evenly
spread). Sampling early and often catches a span over
the threshold even when this thread is scheduled late (a loaded host, or a wait for the
GIL while the blocker runs pure Python); the profiler then names the code site most of
the samples agree on, not code that merely ran after the culprit in the same span
(such as the server writing the response). The wake-up loop itself is C
(``_accel.Watch``): while spans are short it looks at the hook's span without the GIL,
so the hub's thread pays nothing for it; it takes the GIL, and runs the sampling below,
only for a span older than half the threshold. (A Python loop cost the hub's thread a
GIL hand-off per wake-up: ~60-90 us each on these VMs, 100 a second.)

Two best-effort settings keep the samples on time: the thread asks for real-time
round-robin scheduling (honoured with CAP_SYS_NICE, e.g. as root; it runs microseconds
per wake-up), and the profiler lowers the interpreter's switch interval so that a
pure-Python blocker hands this thread the GIL within ~1 ms instead of 5 ms.

On Linux it also reads, at each wake-up, how long the hub's thread has waited on the CPU
run queue so far (/proc schedstat, ~1 us): the profiler compares the last reading before
a long span with one at its end to tell a loop stalled by the OS (an overloaded host)
from code that blocks. The reading may start a little before the span: the wait it
reports is an upper bound.
"""

from __future__ import annotations

import os
import sys
from time import perf_counter
from typing import TYPE_CHECKING, Any

from gevent.monkey import get_original

from ._accel import Hook, Watch
from .stacks import Stack, extract, is_profiler

if TYPE_CHECKING:  # a type that exists only in _accel.pyi
    from ._accel import _WatchStats

Samples = tuple[tuple[Stack, float], ...]
MAX_SAMPLES = 16

_get_ident = get_original("_thread", "get_ident")
_get_native_id = get_original("_thread", "get_native_id")


class Watchdog:
    def __init__(self, current: Hook, hub: Any, threshold_s: float) -> None:
        self.current = current
        self.hub = hub
        self.threshold = threshold_s
        self.period = max(threshold_s / 2, 0.0005)
        self.thread_id = _get_ident()  # the hub's thread: the caller's
        # (span start, ((stack, seconds into the span), ...), run-queue wait (ns) at the
        # first sample, the function its greenlet runs): the latest long span's samples.
        self.capture: tuple[float, Samples, int | None, Any] | None = None
        self._schedstat = _open_schedstat()
        self._loop: Watch | None = None
        self._stats: _WatchStats = {"wakeups": 0, "errors": 0, "realtime": False, "native_id": 0}
        self._span, self._interval = 0.0, self.period
        self._baseline: int | None = None
        self._run: Any = None
        self._samples: Samples = ()

    def start(self) -> None:
        """Start the thread and wait (at most a second) until it runs: a span that blocks
        right after install is then watched too."""
        if self._schedstat is None:  # closed by close(): started again
            self._schedstat = _open_schedstat()
        fd = self._schedstat if self._schedstat is not None else -1
        self._span, self._samples, self._interval, self._baseline = 0.0, (), self.period, None
        self._loop = Watch(self.current, self.period, self.threshold, self._sample, fd)
        self._loop.start()

    def stop(self) -> None:
        if self._loop is not None:
            self._stats = self._loop.stats()
            self._loop.stop()
            self._loop = None

    def _stat(self) -> _WatchStats:
        """The running thread's counters, else the last one's."""
        return self._loop.stats() if self._loop is not None else self._stats

    @property
    def wakeups(self) -> int:
        return self._stat()["wakeups"]

    @property
    def errors(self) -> int:
        return self._stat()["errors"]

    @property
    def realtime(self) -> bool:
        return self._stat()["realtime"]

    @property
    def native_id(self) -> int | None:
        """The watchdog thread's, for its CPU time."""
        return self._stat()["native_id"] or None  # 0: the thread has not run

    @property
    def reading(self) -> tuple[float, int | None]:
        """(time, run-queue wait) at the last wake-up."""
        return self._loop.readings()[0] if self._loop is not None else (0.0, None)

    def cpu_seconds(self) -> float | None:
        """CPU time the watchdog thread has used (Linux), to show what it costs."""
        try:
            with open(f"/proc/self/task/{self.native_id}/schedstat", "rb") as f:
                return int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    def after_fork(self) -> None:
        """In a forked child: the thread is gone (its loop object is left alone: it must
        not be joined) and the schedstat file is the parent's."""
        if self._schedstat is not None:
            os.close(self._schedstat)
        self._schedstat = _open_schedstat()
        self.capture, self._loop = None, None
        self.start()

    def runqueue_wait(self) -> int | None:
        """Nanoseconds the hub's thread has spent runnable but not running, if known."""
        if self._schedstat is None:
            return None
        try:
            return int(os.pread(self._schedstat, 128, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        self.stop()
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None

    def _sample(self) -> float:
        """A span older than half the threshold (called by the C loop, with the GIL):
        sample its stack; return how long to sleep."""
        start, greenlet = self.current[0]
        if greenlet is self.hub or self._loop is None:
            return self.threshold
        # The run-queue baseline of a span is the last reading taken before it started.
        reading, previous = self._loop.readings()
        age = perf_counter() - start
        if age < self.period:  # it ended while this thread waited for the GIL; as in C:
            return self.period - age if age >= self.period / 5 else self.threshold
        frame = sys._current_frames().get(self.thread_id)
        stack = extract(frame)
        del frame
        # Keep it only if that span is still the one running and we did not catch the
        # thread inside the tracer hook (which runs in the *next* greenlet).
        if self.current[0][0] != start or not stack or is_profiler(stack[-1][0]):
            return self.period
        if start != self._span:
            self._baseline = previous[1] if previous[0] <= start else reading[1]
            self._span, self._samples, self._interval = start, (), self.period
            # What the greenlet runs, for its name: a gevent Greenlet forgets it when it
            # ends, possibly before the switch that ends this span.
            self._run = getattr(greenlet, "_run", None)
        elif len(self._samples) >= MAX_SAMPLES:
            self._samples, self._interval = self._samples[1::2], self._interval * 2
        self._samples += ((stack, age),)
        self.capture = (start, self._samples, self._baseline, self._run)
        return self._interval


def _open_schedstat() -> int | None:
    """The calling thread's /proc schedstat file (Linux), kept open: one pread per reading."""
    try:
        return os.open(f"/proc/self/task/{_get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:
        return None

