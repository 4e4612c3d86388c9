"""Sealed copies: serve a file's bytes from memory that no one can change, shrink or grow.

A memory-mapped file rewritten in place (``cp new users.cqss``, ``rsync --inplace``, a
truncation) sends SIGBUS to every process touching a page it lost: every worker at
once. So a store is never mapped from its own file. ``share`` copies it into a memfd
and seals it (``F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_WRITE|F_SEAL_SEAL``: the kernel refuses
any change, to anyone, for good); the store maps that copy, and the file can then be
rewritten, truncated or deleted without the node noticing until it is whole again.

The copy is made once per content and shared: processes mapping the same memfd share
its pages, so 10 M users still cost their memory once across workers. Each process
holding a copy leaves a link to it, ``/proc/<pid>/fd/<n>``, in ``DIR/<key>/`` (``DIR``
is ``tafe-sealed-<uid>`` in the temporary directory); a process wanting the same
content (the same ``key``) opens one of those links instead of copying. Every holder
links, not only the one that copied, so the copy stays findable while any process
holds it (a rolling restart replaces every worker). Links are checked, not trusted: a
dead holder's link dangles and a reused pid's points elsewhere; both are rejected (not
sealed, or ``accept`` refuses what it reads) and removed. A copy is linked only once
``accept`` has validated it. One ``flock`` on ``DIR/<key>`` serializes all this, so workers
starting together wait for the first copy rather than each making one.

Why links to memfds rather than files under a run directory: a regular file cannot be
sealed (a ``cp`` onto it would SIGBUS the node again) and outlives a crash, while a
memfd can be sealed and goes away with its last holder.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable
from typing import BinaryIO, TypeVar

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
T = TypeVar("T")


class Copy:
    """One process's hold on a sealed copy: a read-only fd, and the link others find it by."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.link = ""

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def publish(self, key_dir: str) -> None:
        """Link ``key_dir/<pid>-<fd>`` to this fd (under the directory lock)."""
        link = os.path.join(key_dir, f"{os.getpid()}-{self.fd}")
        for _ in range(3):  # a closing holder may remove key_dir, empty, meanwhile
            try:
                os.makedirs(key_dir, mode=0o700, exist_ok=True)
                if os.path.lexists(link):  # a dead process's, with our pid and fd number
                    os.unlink(link)
                os.symlink(f"/proc/{os.getpid()}/fd/{self.fd}", link)
            except FileNotFoundError:
                continue
            except OSError:
                return  # unshared, still sealed: costs memory, not correctness
            self.link = link
            return

    def close(self) -> None:
        """Unlink, then close: a link never names a closed (reusable) fd of ours."""
        if self.link:
            _remove(self.link)
            try:
                os.rmdir(os.path.dirname(self.link))  # the last holder tidies up
            except OSError:
                pass
            self.link = ""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def share(src: BinaryIO, key: str, accept: Callable[[Copy], T], *, name: str = "tafe") -> T:
    """``accept(copy)`` for a sealed copy of ``src``'s bytes: one already shared under ``key``
    if one is alive and accepted, else a new one (shared once accepted).

    ``key`` must name the content (e.g. a checksum of a header that names the rest);
    ``accept`` validates what it is given and raises if it is not that content. The
    copy belongs to what ``accept`` returns, which must ``close`` it when done. Blocks
    on I/O and on other processes' copies: call it off the event loop.
    """
    directory = _directory()
    if directory is None:
        return _accept(_copy(src, name), accept)
    _sweep(directory, key)
    key_dir = os.path.join(directory, key)
    try:
        os.makedirs(key_dir, mode=0o700, exist_ok=True)
        lock = os.open(key_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return _accept(_copy(src, name), accept)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for link in _links(key_dir):
            try:
                fd = os.open(link, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                _remove(link)  # its holder is gone
                continue
            copy = Copy(fd)
            try:
                if not _sealed(fd):
                    raise ValueError("not a sealed copy")
                result = accept(copy)
            except Exception:  # noqa: BLE001 - anything but the content asked for
                copy.close()
                _remove(link)
                continue
            copy.publish(key_dir)
            return result
        copy = _copy(src, name)
        result = _accept(copy, accept)
        copy.publish(key_dir)
        return result
    finally:
        try:
            os.rmdir(key_dir)  # only if no copy is linked: a refused file leaves nothing
        except OSError:
            pass
        os.close(lock)


def _accept(copy: Copy, accept: Callable[[Copy], T]) -> T:
    try:
        return accept(copy)
    except BaseException:
        copy.close()
        raise


def _copy(src: BinaryIO, name: str) -> Copy:
    """A new memfd holding ``src``'s bytes, sealed; whatever was read if it shrank meanwhile."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size, done = os.fstat(src.fileno()).st_size, 0
        while done < size:
            sent = os.sendfile(fd, src.fileno(), done, size - done)  # in the kernel, GIL released
            if not sent:
                break
            done += sent
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
        os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the copy is what stays in memory
    except BaseException:
        os.close(fd)
        raise
    return Copy(fd)


def _sealed(fd: int) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
    except OSError:  # not a memfd
        return False


def _sweep(directory: str, keep: str) -> None:
    """Remove links whose holder died without closing (killed) under every other key, and
    keys left empty, so the directory does not grow with every content ever served. A
    link is removed only when it dangles (its process is gone); rmdir only succeeds
    on an empty directory, and ``publish`` retries if one goes away under it. Cost: a
    listing and a stat per link, once per store opened (off the event loop)."""
    try:
        keys = os.listdir(directory)
    except OSError:
        return
    for key in keys:
        if key == keep:
            continue
        key_dir = os.path.join(directory, key)
        for link in _links(key_dir):
            if not os.path.exists(link):
                _remove(link)
        try:
            os.rmdir(key_dir)
        except OSError:
            pass


def _links(key_dir: str) -> list[str]:
    try:
        return [os.path.join(key_dir, n) for n in sorted(os.listdir(key_dir))]
    except OSError:
        return []


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _directory() -> str | None:
    """``tafe-sealed-<uid>`` in the temporary directory, private to this user; None if unusable."""
    path = os.path.join(tempfile.gettempdir(), f"tafe-sealed-{os.getuid()}")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    if st.st_uid != os.getuid() or not os.path.isdir(path) or os.path.islink(path):
        return None  # someone else's: copy without sharing
    return path
