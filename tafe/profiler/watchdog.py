"""A real OS thread that takes the stack of a greenlet while it still blocks the loop.

When the running span passes the threshold, the hub's thread is by definition not
running the loop, so the only way to see *what* it is doing is from another thread:
``sys._current_frames()[hub thread]``. The thread is started and paused with gevent's
saved originals (``get_original``), so monkey-patching does not turn it into a greenlet.

While spans are short it wakes once per threshold; a span it finds older than half the
threshold is then sampled every half threshold (the interval doubling whenever the
span's 16 samples are thinned to 8, so memory stays bounded and samples stay evenly
spread). Sampling early and often catches a span over
the threshold even when this thread is scheduled late (a loaded host, or a wait for the
GIL while the blocker runs pure Python); the profiler then names the code site most of
the samples agree on, not code that merely ran after the culprit in the same span
(such as the server writing the response). Each wake-up costs the hub's thread a GIL
hand-off, which is why it does not wake more often.

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
from typing import Any

from gevent.monkey import get_original

from .stacks import Stack, extract, is_profiler

Samples = tuple[tuple[Stack, float], ...]
MAX_SAMPLES = 16

_start_new_thread = get_original("_thread", "start_new_thread")
_get_ident = get_original("_thread", "get_ident")
_sleep = get_original("time", "sleep")
_allocate_lock = get_original("_thread", "allocate_lock")
_get_native_id = get_original("_thread", "get_native_id")


class Watchdog:
    def __init__(self, current: list[tuple[float, Any]], hub: Any, threshold_s: float) -> None:
        self.current = current
        self.hub = hub
        self.threshold = threshold_s
        self.period = max(threshold_s / 2, 0.0005)
        self.thread_id = _get_ident()  # the hub's thread: the caller's
        # (span start, ((stack, seconds into the span), ...), run-queue wait (ns) at the
        # first sample): the samples of the latest long span.
        self.capture: tuple[float, Samples, int | None] | None = None
        self._schedstat = _open_schedstat()
        self.wakeups = 0
        self.errors = 0
        self.realtime = False
        self.native_id: int | None = None  # the watchdog thread's, for its CPU time
        self.reading: tuple[float, int | None] = (0.0, None)  # (time, run-queue wait) at the last wake-up
        self._generation = 0
        self._span, self._interval, self._baseline = 0.0, self.period, None
        self._samples: Samples = ()

    def start(self) -> None:
        """Start the thread and wait (at most a second) until it runs: a span that blocks
        right after install is then watched too."""
        self._generation += 1
        running = _allocate_lock()
        running.acquire()
        _start_new_thread(self._run, (self._generation, running))
        running.acquire(True, 1.0)

    def stop(self) -> None:
        self._generation += 1  # the running thread sees it changed and ends

    def cpu_seconds(self) -> float | None:
        """CPU time the watchdog thread has used (Linux), to show what it costs."""
        try:
            with open(f"/proc/self/task/{self.native_id}/schedstat", "rb") as f:
                return int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    def after_fork(self) -> None:
        """In a forked child: the thread is gone and the schedstat file is the parent's."""
        if self._schedstat is not None:
            os.close(self._schedstat)
        self._schedstat = _open_schedstat()
        self.capture, self.reading = None, (0.0, None)
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

    def _run(self, generation: int, running: Any) -> None:
        self.realtime = _prioritize()
        self.native_id = _get_native_id()
        running.release()
        # The span being sampled (owned by this thread): its start, samples, sampling
        # interval and run-queue baseline.
        self._span, self._samples, self._interval, self._baseline = 0.0, (), self.period, None
        while generation == self._generation:
            self.wakeups += 1
            try:
                _sleep(self._wake())
            except Exception:  # keep watching; count it
                self.errors += 1
                _sleep(self.period)

    def _wake(self) -> float:
        """Look at the span in progress, sample it if long enough; return how long to sleep."""
        start, greenlet = self.current[0]
        # The run-queue baseline of a span is the last reading taken before it started.
        previous, self.reading = self.reading, (perf_counter(), self.runqueue_wait())
        if greenlet is self.hub:
            return self.threshold
        age = self.reading[0] - start
        if age < self.period:
            # A young span: the loop is switching. Look again one threshold later (each
            # wake-up costs the hub's thread a GIL hand-off, so not more often): a span
            # over 1.5x the threshold is still sampled before it ends.
            return self.threshold
        frame = sys._current_frames().get(self.thread_id)
        stack = extract(frame)
        del frame
        # Keep it only if that span is still the one running and we did not catch the
        # thread inside the tracer hook (which runs in the *next* greenlet).
        if self.current[0][0] != start or not stack or is_profiler(stack[-1][0]):
            return self.period
        if start != self._span:
            self._baseline = previous[1] if previous[0] <= start else self.reading[1]
            self._span, self._samples, self._interval = start, (), self.period
        elif len(self._samples) >= MAX_SAMPLES:
            self._samples, self._interval = self._samples[1::2], self._interval * 2
        self._samples += ((stack, age),)
        self.capture = (start, self._samples, self._baseline)
        return self._interval


def _open_schedstat() -> int | None:
    """The calling thread's /proc schedstat file (Linux), kept open: one pread per reading."""
    try:
        return os.open(f"/proc/self/task/{_get_native_id()}/schedstat", os.O_RDONLY)
    except OSError:
        return None


def _prioritize() -> bool:
    """Ask the OS to run this thread as soon as it wakes; False where not permitted."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))  # 0: the calling thread
        return True
    except (AttributeError, OSError):
        return False
