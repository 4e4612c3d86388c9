"""Child processes and signals, for the processes that supervise others: the pre-fork
master (``tafe.master``), ``tafe up`` and ``tafe nginx run``.

No gevent here: supervisors wait in one ``select`` loop (``SignalQueue``), never in a
patched event loop, so nothing a child does can stall them.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Callable, Iterable

_PR_SET_PDEATHSIG = 1


def child_preexec(sig: int, *, batch: bool = False) -> Callable[[], None]:
    """A ``preexec_fn`` asking the kernel to send ``sig`` to the child if we die, and
    with ``batch`` to schedule it (and what it forks) as ``SCHED_BATCH``: woken, it
    waits for the running task to wait or use up its slice instead of preempting it."""

    def preexec() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: no such safety net, nothing else changes
            pass
        if batch:
            try:
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            except (OSError, AttributeError):  # not Linux: the default policy, nothing else changes
                pass

    return preexec


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal_{signum}"


def describe_exit(code: int) -> str:
    """A child's exit as a log line says it (``code`` as ``Popen.returncode`` gives it)."""
    return f"killed by signal {-code} ({_signame(-code)})" if code < 0 else f"exited with code {code}"


def cause_label(code: int) -> str:
    """A restart cause as a metric label: the signal's name, or exit_N."""
    return _signame(-code) if code < 0 else f"exit_{code}"


class SignalQueue:
    """Signals as events for a ``select`` loop (self-pipe), never work inside a handler."""

    def __init__(self, signums: Iterable[int]) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w)
        # A Python handler must exist for the C handler to write the signal number
        # to the pipe; the bytes read back are the record of what arrived.
        self._old = {sig: signal.signal(sig, lambda *_: None) for sig in signums}

    def wait(self, timeout: float, fds: Iterable[int] = ()) -> tuple[list[int], list[int]]:
        """Wait up to ``timeout`` for a signal or a readable fd: (signals, readable fds)."""
        readable, _, _ = select.select([self._r, *fds], [], [], max(0.0, timeout))
        signums: list[int] = []
        if self._r in readable:
            readable.remove(self._r)
            try:
                while data := os.read(self._r, 512):
                    signums.extend(data)
            except BlockingIOError:
                pass
        return signums, readable

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._r)
        os.close(self._w)
