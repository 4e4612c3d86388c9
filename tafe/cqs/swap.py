"""Hot swap: a new model, user store or shading table replaces the serving one between requests.

The bid path reads ``holder.current`` once per request and scores every imp against
that snapshot, so a swap (one attribute store, atomic under the GIL) never mixes two
versions inside one request and never makes one wait.

``watch`` runs one greenlet per worker that looks for new files every ``poll_s``
seconds and at once on SIGHUP. In ``settings.watch_dir`` a model is any ``*.cqsm``
file, a store any ``*.cqss`` file and a first-price shading table
(``tafe.core.shading``) any ``*.cqsb`` file (names starting with "." are ignored, so
write under such a name and rename into place: ``tafe cqs build-store --out``, model
saves and ``tafe cqs pipeline`` already do); the newest of each kind wins, else
``settings.model`` / ``settings.store`` (a shading table comes only from the watch
directory: none means the fixed ``first_price_shade``). A changed file is loaded and validated in the hub's thread pool
(the store's copy and checksum pass release the GIL, so the event loop keeps
serving), then swapped in. A bad file is refused with one log line and skipped from
then on (SIGHUP retries it): the old snapshot keeps serving, or the next newest good
file takes its place. An unchanged store is reused, never re-read.

Nothing served depends on the files staying as they were: a model is read into
memory, a store into a sealed copy (``tafe.cqs.sealed``). A file rewritten or
truncated in place is, to the watcher, just a new file: refused while it is not
whole, swapped in (sharing the copy already held if its bytes are the same) once it is.

A replaced store is unmapped only after ``grace_s`` (longer than any request's
deadline), so no request still holding the old snapshot notices; one that somehow
outlives the grace sees "unknown user", not an error. (Unmapping 370 MB costs the
loop under a millisecond: benchmarks/cqs_store.py.)
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NamedTuple

import gevent
import gevent.event

from tafe.core import shading as shading_mod
from tafe.cqs import CqsError, Snapshot
from tafe.cqs import model as model_mod
from tafe.cqs.store import UserStore, open_store
from tafe.settings import Settings

SUFFIXES = {"model": ".cqsm", "store": ".cqss", "shading": shading_mod.SUFFIX}
_Read = tuple[model_mod.Model, UserStore | None, shading_mod.Shading | None]


class Holder:
    """The snapshot the bid path serves from; ``current`` is replaced whole, never mutated."""

    __slots__ = ("current", "on_swap")

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot
        # called as f(old, new) right after each swap, e.g. to update /metrics
        self.on_swap: list[Callable[[Snapshot, Snapshot], None]] = []

    def swap(self, new: Snapshot) -> None:
        old, self.current = self.current, new
        for callback in self.on_swap:
            callback(old, new)


class FileId(NamedTuple):
    """What makes a file "new": a rename into place changes the inode, a rewrite the mtime."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int


def file_id(path: str) -> FileId | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return FileId(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Watcher:
    """Finds new model/store files and swaps them in; one per worker process."""

    def __init__(self, holder: Holder, settings: Settings, log: logging.Logger, *, poll_s: float = 1.0, grace_s: float | None = None) -> None:
        self.holder = holder
        self.settings = settings
        self.log = log
        self.poll_s = poll_s
        # twice the longest deadline a request can have, and at least a second
        self.grace_s = grace_s if grace_s is not None else max(1.0, 2 * settings.max_tmax_ms / 1000)
        self.loaded = {"model": file_id(settings.model), "store": file_id(settings.store), "shading": None}
        self.refused: set[FileId] = set()
        self.swaps = 0
        self._wake = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None

    def wanted(self, kind: str) -> FileId | None:
        """The newest ``*.cqsm``/``*.cqss``/``*.cqsb`` of the watched directory not refused, else the configured file."""
        found: list[FileId] = []
        if self.settings.watch_dir:
            try:
                names = os.listdir(self.settings.watch_dir)
            except OSError:
                names = []
            for name in names:
                if not name.startswith(".") and name.endswith(SUFFIXES[kind]):
                    fid = file_id(os.path.join(self.settings.watch_dir, name))
                    if fid is not None and fid not in self.refused:
                        found.append(fid)
        if found:
            return max(found, key=lambda f: (f.mtime_ns, f.path))
        configured = file_id(self.settings.model if kind == "model" else self.settings.store if kind == "store" else "")
        return configured if configured not in self.refused else None

    def check(self) -> bool:
        """Load whatever changed and swap it in; True if a swap happened.

        A refused file is skipped from then on, so the next newest (or the configured
        file) gets its chance at once: a worker started after a bad drop still finds
        the last good file, as its siblings did.
        """
        swapped = False
        while True:
            changes: dict[str, FileId] = {}
            for kind in SUFFIXES:
                fid = self.wanted(kind)
                if fid is not None and fid != self.loaded[kind]:
                    changes[kind] = fid
            if not changes:
                return swapped
            old = self.holder.current
            # While the pool thread runs Python (model parsing), the loop waits up to a
            # switch interval for the GIL: make that 1 ms, not 5, meanwhile.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, 0.001))
            try:
                new = _load(old, changes)
            except Refused as exc:
                self.refused.add(exc.file)
                self.log.error(
                    "cqs: refused %s %s, keeping the served snapshot: %s", exc.kind, exc.file.path, exc.why(),
                    extra={"fields": old.versions},  # model=..., store=...: what still serves
                )
                continue
            finally:
                sys.setswitchinterval(interval)
            self.holder.swap(new)
            self.loaded.update(changes)
            self.swaps += 1
            swapped = True
            self.log.info("cqs: swapped in %s", _names(changes), extra={"fields": _swap_fields(old, new)})
            if old.store is not None and old.store is not new.store:
                gevent.spawn_later(self.grace_s, old.store.close)

    def hangup(self) -> None:
        """SIGHUP: look now, and give refused files another chance."""
        self.refused.clear()
        self._wake.set()

    def run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # a watcher that dies would silently stop all future swaps
                self.log.exception("cqs: hot-swap check failed; will retry")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def start(self) -> Watcher:
        gevent.get_hub().threadpool.spawn(int)  # start the pool's thread now, not mid-swap
        self._greenlet = gevent.spawn(self.run)
        return self

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None


def _names(changes: dict[str, FileId]) -> str:
    return ", ".join(f"{kind} {fid.path}" for kind, fid in changes.items())


def _swap_fields(old: Snapshot, new: Snapshot) -> dict[str, str]:
    """The log fields of a swap: what serves now (model=, store=, as "listening on" has
    them) and what served before (was_model=, was_store=)."""
    return {**new.versions, **{f"was_{kind}": version for kind, version in old.versions.items()}}


class Refused(Exception):
    """One file could not be used; ``reason`` says why (CqsError, or anything unforeseen)."""

    def __init__(self, kind: str, file: FileId, reason: BaseException) -> None:
        super().__init__(kind, file, reason)
        self.kind, self.file, self.reason = kind, file, reason

    def why(self) -> str:
        """The reason in one line (a CqsError's message already names the file)."""
        r = self.reason
        return str(r) if isinstance(r, CqsError) else f"{self.kind} {self.file.path}: {type(r).__name__}: {r}"


def _load(old: Snapshot, changes: dict[str, FileId]) -> Snapshot:
    """Read and validate what changed, reuse what did not; raises Refused naming the bad file.

    The whole-file work (copying and checking a store, parsing a model) runs in the
    hub's thread pool, mostly in syscalls and zlib with the GIL released; the snapshot
    is built here. Keeping Python out of the pool thread matters on a busy machine: a
    thread descheduled while it holds the GIL stalls the loop for as long as it is off-CPU.
    """
    read: _Read | Refused = gevent.get_hub().threadpool.apply(_read, (old, changes))
    if isinstance(read, Refused):
        raise read
    model, store, shading = read
    try:
        return Snapshot(model, store, shading)
    except Exception as exc:
        if store is not None and store is not old.store:
            store.close()
        kind = "model" if "model" in changes else "store"
        raise Refused(kind, changes[kind], exc) from None


def _read(old: Snapshot, changes: dict[str, FileId]) -> _Read | Refused:
    """In a pool thread: (model, store, shading), or why not as a Refused.

    Returned, never raised: gevent prints a traceback for an exception that leaves a
    pool function, and a refused file must make exactly one log line.
    """
    model, store, shading = old.model, old.store, old.shading
    store_file, model_file, shading_file = changes.get("store"), changes.get("model"), changes.get("shading")
    try:
        if store_file:
            try:
                store = open_store(store_file.path)
            except Exception as exc:
                raise Refused("store", store_file, exc) from None
        if model_file:
            try:
                model = model_mod.load(model_file.path)
            except Exception as exc:
                raise Refused("model", model_file, exc) from None
        if shading_file:
            try:
                shading = shading_mod.load(shading_file.path)
            except shading_mod.ShadingError as exc:
                raise Refused("shading", shading_file, CqsError(str(exc))) from None
            except Exception as exc:
                raise Refused("shading", shading_file, exc) from None
        return model, store, shading
    except Refused as refused:
        if store is not None and store is not old.store:
            store.close()
        return refused


def watch(holder: Holder, settings: Settings, log: logging.Logger, *, poll_s: float = 1.0) -> Watcher:
    """Start hot swap for this process: poll ``settings.watch_dir`` and reload on SIGHUP."""
    watcher = Watcher(holder, settings, log, poll_s=poll_s)
    try:
        watcher.check()  # before the first request: a new worker serves what its siblings serve
    except Exception:  # noqa: BLE001 - the loop below retries
        log.exception("cqs: hot-swap check failed; will retry")
    watcher.start()
    try:
        gevent.signal_handler(signal.SIGHUP, watcher.hangup)
    except ValueError:  # not the main thread (tests): polling still works
        pass
    return watcher
