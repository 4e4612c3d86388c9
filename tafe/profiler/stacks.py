"""Stacks as plain tuples, and which of their frames are the application's.

A stack is a tuple of ``(filename, lineno, function)`` from the outermost frame to the
innermost, like ``traceback.extract_stack`` but without reading source files: stacks
are taken in the tracer callback or in the watchdog thread, where cost matters.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Collection, Iterable
from types import FrameType

Frame = tuple[str, int, str]
Stack = tuple[Frame, ...]

MAX_DEPTH = 64

_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_prefixes() -> tuple[str, ...]:
    """Code that is never the culprit itself: the standard library, gevent, greenlet, us."""
    prefixes = {_HERE}
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            prefixes.add(os.path.realpath(path) + os.sep)
            prefixes.add(path + os.sep)
    for name in ("gevent", "greenlet"):
        try:
            module = __import__(name)
        except ImportError:  # pragma: no cover - gevent is a dependency
            continue
        if module.__file__ is not None:
            prefixes.add(os.path.dirname(os.path.abspath(module.__file__)) + os.sep)
    return tuple(sorted(prefixes))


LIBRARY_PREFIXES = _library_prefixes()


def extract(frame: FrameType | None, limit: int = MAX_DEPTH) -> Stack:
    """The stack ending at ``frame``, outermost first, at most ``limit`` innermost frames."""
    frames: list[Frame] = []
    while frame is not None and len(frames) < limit:
        code = frame.f_code
        frames.append((code.co_filename, frame.f_lineno or 0, code.co_name))
        frame = frame.f_back
    frames.reverse()
    return tuple(frames)


def is_library(filename: str) -> bool:
    return filename.startswith(LIBRARY_PREFIXES) or filename.startswith("<")


def is_profiler(filename: str) -> bool:
    return filename.startswith(_HERE)


def app_frame(stack: Stack) -> Frame | None:
    """The innermost frame in application code, else the innermost frame at all."""
    for frame in reversed(stack):
        if not is_library(frame[0]):
            return frame
    return stack[-1] if stack else None


def dominant(samples: Iterable[tuple[Stack, float]], server_files: Collection[str] = ()) -> tuple[Stack, float] | None:
    """The culprit among the samples of one long span: samples in application code
    first (after a handler returns, the server's own code runs on in the same span,
    and a late sample may land there: library code, or ``server_files``), then the
    application frame most samples share, then the later sample."""
    samples = list(samples)
    keys = [app_frame(stack) for stack, _ in samples]
    counts: dict[Frame | None, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1

    def rank(i: int) -> tuple[bool, int, int]:
        key = keys[i]
        return (key is not None and not is_library(key[0]) and key[0] not in server_files, counts[key], i)

    best = max(range(len(samples)), key=rank, default=None)
    return None if best is None else samples[best]


def format_frame(frame: Frame) -> str:
    filename, lineno, name = frame
    return f"{_short(filename)}:{lineno} {name}"


def format_stack(stack: Iterable[Frame]) -> list[str]:
    return [format_frame(f) for f in stack]


def collapsed_frame(frame: Frame) -> str:
    """One frame as flamegraph.pl / speedscope expect it: no ';' and no spaces."""
    filename, lineno, name = frame
    return f"{name} ({_short(filename)}:{lineno})".replace(";", ":").replace(" ", "_")


def _short(filename: str) -> str:
    """Paths relative to the library roots or the working directory, to keep lines short."""
    for prefix in _SHORTEN:
        if filename.startswith(prefix):
            return filename[len(prefix):]
    return filename


def _shorten_prefixes() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("purelib", "platlib", "stdlib", "platstdlib") if k in paths}
    roots |= {os.path.realpath(r) for r in roots}
    roots.add(os.getcwd())
    # Longest first, so site-packages wins over the stdlib directory that contains it.
    return tuple(sorted((r.rstrip(os.sep) + os.sep for r in roots), key=len, reverse=True))


_SHORTEN = _shorten_prefixes()
