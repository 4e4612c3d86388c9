"""The event sink: wins, bills, losses, impressions and clicks as JSON lines, for the training join.

``EventSink`` is the interface (``emit`` an event, ``flush`` what is buffered); TAFE
ships two: ``NullSink`` (counts nothing, writes nothing) and ``RotatingFiles``, JSON
lines in a directory, one file per worker process and rotation period
(``events-<host>-<pid>-<UTC yyyymmddThhmm>.jsonl``), so workers never share a file.

``emit`` only appends to a list: no system call on the request path. ``flush`` (run
once a second by the worker, in the hub's thread pool under gevent, so a slow disk does
not stall the event loop) writes everything buffered in one ``write``. A sink whose disk
stays stuck drops past ``max_buffered`` bytes and counts what it dropped.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Protocol

import orjson

__all__ = ["EventSink", "NullSink", "RotatingFiles"]


class EventSink(Protocol):
    dropped: int

    def emit(self, event: dict[str, Any]) -> None:
        """Buffer one event (no system call)."""
        ...

    def take(self) -> bytes:
        """Empty the buffer (on the event loop), for ``write``."""
        ...

    def write(self, data: bytes) -> None:
        """Write what ``take`` returned (may block on the disk: off the event loop)."""
        ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NullSink:
    dropped = 0

    def emit(self, event: dict[str, Any]) -> None:
        pass

    def take(self) -> bytes:
        return b""

    def write(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RotatingFiles:
    """JSON lines in ``directory``; a new file every ``rotate_s`` seconds (UTC-aligned)."""

    def __init__(self, directory: str, *, rotate_s: int = 3600, max_buffered: int = 16 << 20) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.rotate_s = rotate_s
        self.max_buffered = max_buffered
        self.dropped = 0
        self.written = 0
        self.errors = 0
        self._buf: list[bytes] = []
        self._size = 0
        self._fd = -1
        self._slot = -1
        self._tag = f"{socket.gethostname()}-{os.getpid()}"

    def emit(self, event: dict[str, Any]) -> None:
        line = orjson.dumps(event) + b"\n"
        if self._size + len(line) > self.max_buffered:
            self.dropped += 1
            return
        self._buf.append(line)
        self._size += len(line)

    def take(self) -> bytes:
        """What is buffered, emptied (taken on the event loop; written by ``write``)."""
        data = b"".join(self._buf)
        self._buf, self._size = [], 0
        return data

    def write(self, data: bytes, now: float | None = None) -> None:
        """Write taken bytes to the current file (may block: call it off the event loop)."""
        if not data:
            return
        slot = int((time.time() if now is None else now) // self.rotate_s)
        try:
            if slot != self._slot:
                self._rotate(slot)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self.written += data.count(b"\n")
        except OSError:
            self.errors += 1
            self.dropped += data.count(b"\n")

    def flush(self) -> None:
        self.write(self.take())

    def _rotate(self, slot: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        stamp = time.strftime("%Y%m%dT%H%M", time.gmtime(slot * self.rotate_s))
        path = os.path.join(self.directory, f"events-{self._tag}-{stamp}.jsonl")
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._slot = slot

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
