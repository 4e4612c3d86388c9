"""The user-state store: one compact binary file that every worker memory-maps.

Ten million users in Python dicts cost gigabytes per worker; here they cost 38 bytes
each, once, shared by every process that serves them. Lookups walk the mapping
directly: no per-user Python objects exist, so refcounting never dirties (un-shares) a
page. What is mapped is not the file but a sealed copy of it made once per node
(``tafe.cqs.sealed``): a file rewritten or truncated in place cannot SIGBUS the workers.

File format (version 1; all integers little-endian)::

    offset  size  field
    0       8     magic  b"TAFEUSR\\0"
    8       2     format version (1)
    10      2     bucket bits B (0..24)
    12      4     record size R (bytes)
    16      8     user count N
    24      8     as_of (float64, unix seconds)
    32      32    store version (UTF-8, NUL-padded)
    64      4     layout check: crc32 of the record format and UserState field names
    68      4     data check: crc32 of everything after the header
    72      52    zero
    124     4     header check: crc32 of bytes 0..123
    128           bucket index: 2**B + 1 uint64, the first key position of each bucket
                  (bucket = top B bits of the key hash; the last entry is N)
    ...           keys: N uint64, sorted ascending: xxh3-64 of the UTF-8 user key
    ...           records: N x R bytes, UserState fields in order as uint16, aligned
                  with the keys (record i belongs to key i)

The file size must be exactly what the header says. A key hash is XXH3-64 (stable
across processes and machines, unlike ``hash()``); two keys colliding in 64 bits
(about one chance in 10^6 at 10 M users) share one record. Counts saturate at 65535.

A lookup hashes the key, reads the bucket's bounds from the index and bisects the
few keys inside it (about ten at any size), then unpacks one record: ~2 us in all.

Aggregation (``build_store``): an event counts in a window W when
``0 <= as_of - ts < W`` (1, 7, 30, 365 days); ``hours_since_*`` is the whole hours
before ``as_of`` of the latest such event within 365 days, else ``NEVER``. A user is
in the store when at least one of their events falls within 365 days.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import time
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import orjson
from xxhash import xxh3_64_intdigest

from tafe.cqs import CqsError, sealed
from tafe.cqs.state import EVENT_TYPES, NEVER, UserState

if TYPE_CHECKING:  # numpy is imported where a store is built, never on the bid path
    import argparse

    import numpy as np

MAGIC = b"TAFEUSR\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHIQd32sII52sI")
HEADER_SIZE = 128
RECORD = struct.Struct("<" + "H" * len(UserState._fields))
LAYOUT_CRC = zlib.crc32((RECORD.format + ":" + ",".join(UserState._fields)).encode())
MAX_BUCKET_BITS = 24
CHUNK = 8 << 20  # bytes checksummed per call while writing

DAY = 86400.0
# (field, event type, window seconds) for every count in UserState
COUNTS = (
    ("views_1d", "view", DAY),
    ("views_7d", "view", 7 * DAY),
    ("views_30d", "view", 30 * DAY),
    ("carts_7d", "cart", 7 * DAY),
    ("carts_30d", "cart", 30 * DAY),
    ("purchases_30d", "purchase", 30 * DAY),
    ("purchases_365d", "purchase", 365 * DAY),
    ("shown_1d", "shown", DAY),
    ("shown_7d", "shown", 7 * DAY),
    ("clicks_7d", "click", 7 * DAY),
    ("clicks_30d", "click", 30 * DAY),
)
RECENCIES = (
    ("hours_since_view", "view"),
    ("hours_since_cart", "cart"),
    ("hours_since_purchase", "purchase"),
    ("hours_since_click", "click"),
)
KEPT = 365 * DAY
assert HEADER.size == HEADER_SIZE
assert {f for f, _, _ in COUNTS} | {f for f, _ in RECENCIES} == set(UserState._fields)

class StoreError(CqsError, ValueError):
    """A store file is unusable; the message names the file and the fault."""


class StoreInfo(NamedTuple):
    path: str
    version: str
    as_of: float
    users: int
    events: int
    bytes: int


def key_hash(key: str) -> int:
    """The stable 64-bit hash a user key is stored under."""
    return xxh3_64_intdigest(key.encode())


def bucket_bits(users: int) -> int:
    """Enough buckets for ~8-16 users each, so a lookup bisects only a handful of keys."""
    return min(MAX_BUCKET_BITS, (users // 16).bit_length())


# --- building --------------------------------------------------------------------------


def read_events(event_files: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """JSON-lines events as arrays (key hash, ts, type index); a bad line raises StoreError."""
    import numpy as np

    types = {name: i for i, name in enumerate(EVENT_TYPES)}
    hashes, stamps, kinds = array("Q"), array("d"), array("B")  # 17 bytes an event, not ~100 in lists
    last_key, last_hash = None, 0
    for path in event_files:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                try:
                    event = orjson.loads(line)
                    key, ts, kind = event["user"], event["ts"], types[event["type"]]
                    if key != last_key:  # events usually come grouped by user
                        last_key, last_hash = key, xxh3_64_intdigest(key.encode())
                    if not key or not isinstance(ts, (int, float)):
                        raise ValueError("user must be a non-empty string and ts a number")
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    if not line.strip():
                        continue
                    raise StoreError(f"events file {path}:{lineno}: bad event ({exc!r})") from None
                hashes.append(last_hash)
                stamps.append(ts)
                kinds.append(kind)
    return np.frombuffer(hashes, dtype=np.uint64), np.frombuffer(stamps, dtype=np.float64), np.frombuffer(kinds, dtype=np.uint8)


def aggregate(hashes, stamps, kinds, as_of: float):  # type: ignore[no-untyped-def]
    """Per-user states from event arrays: (sorted unique key hashes, records as uint16 [N, fields])."""
    import numpy as np

    age = as_of - np.asarray(stamps, dtype=np.float64)
    kept = (age >= 0) & (age < KEPT)
    age, kinds = age[kept], np.asarray(kinds)[kept]
    keys, user = np.unique(np.asarray(hashes, dtype=np.uint64)[kept], return_inverse=True)
    user = user.ravel()
    n = len(keys)
    records = np.zeros((n, len(UserState._fields)), dtype=np.uint16)
    column = {name: i for i, name in enumerate(UserState._fields)}
    kind_index = {name: i for i, name in enumerate(EVENT_TYPES)}
    of_kind = {name: kinds == i for name, i in kind_index.items()}
    for field, kind, window in COUNTS:
        counts = np.bincount(user[of_kind[kind] & (age < window)], minlength=n)
        records[:, column[field]] = np.minimum(counts, 0xFFFF)
    for field, kind in RECENCIES:
        hours = np.full(n, NEVER, dtype=np.int64)
        mask = of_kind[kind]
        np.minimum.at(hours, user[mask], (age[mask] // 3600).astype(np.int64))
        records[:, column[field]] = hours
    return keys, records


def write_store(keys, records, out_path: str, *, as_of: float, version: str | None = None, events: int = 0) -> StoreInfo:  # type: ignore[no-untyped-def]
    """Write sorted unique ``keys`` (uint64) and their ``records`` atomically (temp + fsync + rename)."""
    import numpy as np

    keys = np.ascontiguousarray(keys, dtype="<u8")
    records = np.ascontiguousarray(records, dtype="<u2")
    n = len(keys)
    if records.shape != (n, len(UserState._fields)):
        raise StoreError(f"store {out_path}: records shape {records.shape} does not match {n} keys")
    if n > 1 and not bool(np.all(keys[1:] > keys[:-1])):
        raise StoreError(f"store {out_path}: keys must be sorted and unique")
    bits = bucket_bits(n)
    starts = np.arange(1 << bits, dtype=np.uint64) << np.uint64(64 - bits) if bits else np.zeros(1, dtype=np.uint64)
    index = np.append(np.searchsorted(keys, starts), n).astype("<u8")
    sections = [a.reshape(-1).view(np.uint8).data for a in (index, keys, records)]
    data_crc = 0
    for section in sections:
        for i in range(0, len(section), CHUNK):
            data_crc = zlib.crc32(section[i : i + CHUNK], data_crc)
    if version is None:
        version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(as_of)) + f"-{data_crc:08x}"
    raw_version = version.encode()
    if not version or len(raw_version) > 32 or b"\0" in raw_version:
        raise StoreError(f"store {out_path}: version must be 1-32 UTF-8 bytes without NUL, got {version!r}")
    header = _pack_header(bits, n, as_of, raw_version, data_crc)
    directory = os.path.dirname(os.path.abspath(out_path))
    tmp = os.path.join(directory, f".{os.path.basename(out_path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            for section in sections:
                f.write(section)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return StoreInfo(out_path, version, as_of, n, events, os.path.getsize(out_path))


def _pack_header(bits: int, users: int, as_of: float, version: bytes, data_crc: int) -> bytes:
    head = HEADER.pack(MAGIC, FORMAT_VERSION, bits, RECORD.size, users, as_of, version, LAYOUT_CRC, data_crc, b"", 0)
    return head[:-4] + struct.pack("<I", zlib.crc32(head[:-4]))


def build_store(
    event_files: Sequence[str], out_path: str, *, as_of: float | None = None, version: str | None = None
) -> StoreInfo:
    """Aggregate JSON-lines event files into a store file (``as_of`` defaults to the last event)."""
    hashes, stamps, kinds = read_events(event_files)
    if as_of is None:
        as_of = float(stamps.max()) if len(stamps) else time.time()
    keys, records = aggregate(hashes, stamps, kinds, as_of)
    return write_store(keys, records, out_path, as_of=as_of, version=version, events=len(stamps))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("events", nargs="+", help="JSON-lines event files (see tafe.cqs.state)")
    parser.add_argument("--out", required=True, help="store file to write (atomically replaced)")
    parser.add_argument("--as-of", type=float, default=None, help="unix time the windows end at (default: the last event)")
    parser.add_argument("--version", default=None, help="store version, 1-32 bytes (default: as_of and checksum)")


def run(args: argparse.Namespace) -> int:
    """``tafe cqs build-store``: build, then print what was written as JSON."""
    started = time.perf_counter()
    info = build_store(args.events, args.out, as_of=args.as_of, version=args.version)
    print(json.dumps({**info._asdict(), "seconds": round(time.perf_counter() - started, 3)}, indent=2))
    return 0


# --- serving ---------------------------------------------------------------------------


class UserStore:
    """A read-only view of one store file; see the module docstring for the format."""

    def __init__(self, path: str, mm: mmap.mmap, copy: sealed.Copy, version: str, as_of: float, users: int, bits: int,
                 crc: int) -> None:
        self.path = path  # the file it was copied from (messages, logs)
        self._copy = copy
        self._crc = crc
        self.version = version
        self.as_of = as_of
        self.users = users
        self._mm: mmap.mmap | None = mm
        self._shift = 64 - bits
        index_end = HEADER_SIZE + ((1 << bits) + 1) * 8
        keys_end = index_end + users * 8
        self._index = memoryview(mm)[HEADER_SIZE:index_end].cast("Q")
        self._keys: Sequence[int] = memoryview(mm)[index_end:keys_end].cast("Q")
        self._records = keys_end
        self._unpack = RECORD.unpack_from

    def lookup(self, keys: Sequence[str]) -> UserState | None:
        """The state under the first key found (keys come in preference order), else None."""
        index, hashes, shift, mm = self._index, self._keys, self._shift, self._mm
        if mm is None:  # closed
            return None
        for key in keys:
            if not key:
                continue
            h = xxh3_64_intdigest(key.encode())
            bucket = h >> shift
            hi = index[bucket + 1]
            i = bisect_left(hashes, h, index[bucket], hi)
            if i < hi and hashes[i] == h:
                return tuple.__new__(UserState, self._unpack(mm, self._records + i * RECORD.size))
        return None

    def verify(self) -> None:
        """Check the data checksum (reading every page); raises StoreError on a mismatch.

        One zlib call over the whole mapping: the GIL is released for all of it, so a
        pool thread doing this takes the GIL back once and never holds up the loop.
        """
        mm = self._mm
        if mm is None:
            raise StoreError(f"store {self.path}: closed")
        with memoryview(mm) as view:
            crc = zlib.crc32(view[HEADER_SIZE:])
        if crc != self._crc:
            raise StoreError(f"store {self.path}: corrupt data (checksum mismatch)")

    def close(self) -> None:
        """Unmap and let go of the copy; any later lookup answers "unknown user"."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        index, keys = self._index, self._keys
        self._index, self._keys, self._shift = memoryview(bytes(24)).cast("Q"), (), 63
        index.release()
        keys.release()  # type: ignore[attr-defined]
        mm.close()
        self._copy.close()

    def __enter__(self) -> UserStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UserStore({self.path!r}, version={self.version!r}, users={self.users})"


def open_store(path: str) -> UserStore:
    """Copy, map and validate a store file; raises StoreError naming the file and the fault.

    The store serves from a sealed in-memory copy shared by every process serving the
    same content (``tafe.cqs.sealed``), never from the file: the file may then be
    rewritten or truncated in place without a SIGBUS. Copying and checking read every
    byte (about a second for 10 M users): call this off the event loop.
    """
    if sys.byteorder != "little":  # pragma: no cover
        raise StoreError(f"store {path}: the store format is little-endian; this machine is not")
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
            if len(head) < HEADER_SIZE:
                raise StoreError(f"store {path}: truncated: {size} bytes, smaller than the {HEADER_SIZE}-byte header")
            # The header names the rest: its own checksum (over the version, sizes and the
            # data checksum) and the size name the content. (Not crc32(head): a CRC over
            # bytes ending in their own CRC is the same constant for every valid header.)
            key = f"{head[-4:].hex()}-{size}"
            return sealed.share(f, key, lambda copy: _map(path, copy, head), name=f"tafe-store:{os.path.basename(path)}")
    except OSError as exc:
        raise StoreError(f"store {path}: cannot open: {exc.strerror or exc}") from None


def _map(path: str, copy: sealed.Copy, head: bytes) -> UserStore:
    """The store in ``copy``, if it is a whole, valid store with the header read from ``path``."""
    size = copy.size
    if size < HEADER_SIZE:
        raise StoreError(f"store {path}: truncated: {size} bytes, smaller than the {HEADER_SIZE}-byte header")
    mm = mmap.mmap(copy.fd, 0, access=mmap.ACCESS_READ)
    try:
        if mm[:HEADER_SIZE] != head:
            raise StoreError(f"store {path}: changed while being read")
        store = _validate(path, mm, size, copy)
    except BaseException:
        mm.close()
        raise
    try:
        store.verify()
    except BaseException:
        store.close()
        raise
    return store


def _validate(path: str, mm: mmap.mmap, size: int, copy: sealed.Copy) -> UserStore:
    magic, fmt, bits, rsize, users, as_of, raw_version, layout, data_crc, _, head_crc = HEADER.unpack_from(mm, 0)
    if magic != MAGIC:
        raise StoreError(f"store {path}: not a TAFE user store (bad magic {magic!r})")
    if zlib.crc32(mm[: HEADER_SIZE - 4]) != head_crc:
        raise StoreError(f"store {path}: corrupt header (checksum mismatch)")
    if fmt != FORMAT_VERSION:
        raise StoreError(f"store {path}: format version {fmt}, this build reads {FORMAT_VERSION}")
    if layout != LAYOUT_CRC or rsize != RECORD.size:
        raise StoreError(f"store {path}: record layout differs from this build's UserState (rebuild the store)")
    if bits > MAX_BUCKET_BITS:
        raise StoreError(f"store {path}: bad bucket bits {bits}")
    expected = HEADER_SIZE + ((1 << bits) + 1) * 8 + users * (8 + rsize)
    if size != expected:
        fault = "truncated" if size < expected else "trailing bytes"
        raise StoreError(f"store {path}: {fault}: {size} bytes, header says {expected}")
    first, = struct.unpack_from("<Q", mm, HEADER_SIZE)
    last, = struct.unpack_from("<Q", mm, HEADER_SIZE + (1 << bits) * 8)
    if first != 0 or last != users:
        raise StoreError(f"store {path}: corrupt bucket index")
    version = raw_version.rstrip(b"\0").decode("utf-8", "replace")
    return UserStore(path, mm, copy, version, as_of, users, bits, data_crc)
