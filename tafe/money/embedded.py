"""The embedded money state: one LMDB environment shared by the workers of a node.

Why LMDB: every worker process maps the same file; a write transaction is atomic across
processes (a robust process-shared mutex: a worker killed inside one does not wedge the
others) and costs ~4 us here, a read ~1.5 us (measured on this VM with py-lmdb 3:
``benchmarks/RESULTS.md``, "Money loop"). A committed transaction is in the shared
mapping at once, so a worker's ``kill -9`` loses nothing committed; the file is synced to
disk by ``flush`` (once a second from each worker's banker), so a power loss loses at
most that second. A shared-memory design would need its own cross-process locking and
crash recovery, which LMDB already has. Transactions are short and never wait on the
network, so they run on the event loop.

Databases (keys are UTF-8; numbers little-endian int64):

- ``acct``  ``campaign\\0period`` -> budget, spent, reserved, floated, bucket, bucket time (ms), rate
- ``lease`` ``worker\\0campaign\\0period`` -> float nanos, expiry (ms)
- ``res``   ``expiry (s, big-endian) + campaign\\0period`` -> nanos reserved by the bids that time
  out in that second. Summed, not one record per bid (a record per bid cost ~2-7 us a bid
  to write): a notice knows its bid's price and expiry from its token, takes its own
  amount off its second's sum (before the worker has even reported it: the sum then goes
  negative until it does), and does nothing to the sums once its second has passed,
  since the sweep released that whole second then.
- ``seen``  ``kind:bid id`` -> expiry (s) (``winp:`` also the win's clearing price); ``seenx`` indexes it by expiry
- ``freq``  ``user hash`` -> JSON ``{campaign: [unix seconds, ...]}`` (newest last, at most the cap kept)
"""

from __future__ import annotations

import mmap
import os
import shutil
import struct
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import lmdb
import orjson

from tafe.money import pacing
from tafe.money.state import LEASE_S, Account, BidRef, Grant, Reserved, Want

__all__ = ["EmbeddedState", "LEASE_S"]

READ_RENEW_S = 1.0  # the bid path's read snapshot is renewed at least this often
_ACCT = struct.Struct("<7q")
_LEASE = struct.Struct("<2q")
_RES = struct.Struct("<2q")
_RES1 = struct.Struct("<q")
_EXP = struct.Struct(">q")  # big-endian: index keys sort by time
_SWEEP_MAX = 2000  # expired entries dropped per reserve call: bounds the transaction


def _acct_key(campaign: str, period: int) -> bytes:
    return f"{campaign}\0{period}".encode()


class EmbeddedState:
    """``tafe.money.state.State`` on an LMDB environment in directory ``path``."""

    def __init__(self, path: str, *, map_size: int = 1 << 36, temporary: bool = False) -> None:
        """``temporary``: the directory is this object's alone: removed as soon as it is open
        (LMDB and the counter keep their open files; nothing reopens them by name), so not
        even a killed process leaves it behind. Its state is then this process's only."""
        os.makedirs(path, exist_ok=True)
        # map_size is address space, not memory or disk: pages are used as written.
        self.env = lmdb.open(
            path, map_size=map_size, max_dbs=8, sync=False, metasync=False, writemap=True, map_async=True, readahead=False
        )
        self._acct = self.env.open_db(b"acct")
        self._lease = self.env.open_db(b"lease")
        self._res = self.env.open_db(b"res")
        self._seen = self.env.open_db(b"seen")
        self._seenx = self.env.open_db(b"seenx")
        self._freq = self.env.open_db(b"freq")
        self.path = path
        self._read: Any = None  # the bid path's read snapshot (``frequency``)
        self._read_at = 0.0
        self._read_gen = -1
        # How many impressions were ever counted, in a tiny file every worker maps: a
        # worker's snapshot is stale once it changes.
        gen_path = os.path.join(path, "impressions.gen")
        with open(gen_path, "a+b") as f:
            if os.fstat(f.fileno()).st_size < 8:
                f.truncate(8)
            self._gen_map = mmap.mmap(f.fileno(), 8)
        self._gen = memoryview(self._gen_map).cast("q")
        if temporary:
            shutil.rmtree(path, ignore_errors=True)

    # --- accounts ------------------------------------------------------------------

    def _get_acct(self, txn: Any, key: bytes) -> list[int]:
        raw = txn.get(key, db=self._acct)
        return list(_ACCT.unpack(raw)) if raw is not None else [0, 0, 0, 0, 0, 0, 0]

    def _put_acct(self, txn: Any, key: bytes, a: list[int]) -> None:
        txn.put(key, _ACCT.pack(*a), db=self._acct)

    @staticmethod
    def _account(a: list[int]) -> Account:
        return Account(budget=a[0], spent=a[1], reserved=a[2], floated=a[3], rate=a[6])

    # --- reserve ---------------------------------------------------------------------

    def reserve(self, worker: str, used: Sequence[Reserved], wants: Sequence[Want], now: float) -> dict[str, Grant]:
        now_ms = int(now * 1000)
        out: dict[str, Grant] = {}
        with self.env.begin(write=True) as txn:
            self._sweep(txn, now, now_ms)
            accts: dict[bytes, list[int]] = {}

            def acct(key: bytes) -> list[int]:
                a = accts.get(key)
                if a is None:
                    a = accts[key] = self._get_acct(txn, key)
                return a

            # 1. What was bid since the last call becomes reservations, summed per expiry
            # second (its float is returned whole below). A notice that came first has
            # already taken its bid off the same sum, which may so have gone negative.
            # Summed by plain tuples first: a worker reports up to thousands of bids a second.
            sums: defaultdict[tuple[str, int, int], int] = defaultdict(int)
            for _, campaign, period, nanos, expires in used:
                sums[campaign, period, expires] += nanos
            used_by: dict[bytes, int] = {}
            for (campaign, period, expires), nanos in sums.items():
                key = _acct_key(campaign, period)
                used_by[key] = used_by.get(key, 0) + nanos
                acct(key)[2] += nanos
                self._add_reserved(txn, _EXP.pack(expires) + key, nanos)
            # 2. Return this worker's previous floats (what it used is reserved now), grant new ones.
            for w in wants:
                key = _acct_key(w.campaign, w.period)
                a = acct(key)
                a[0] = w.budget
                lkey = f"{worker}\0{w.campaign}\0{w.period}".encode()
                old = txn.get(lkey, db=self._lease)
                if old is not None:
                    held = _LEASE.unpack(old)[0]
                    a[3] -= held
                    a[4] += max(held - used_by.get(key, 0), 0)  # unused float goes back to the pacing bucket
                granted, a[4], a[6] = pacing.grant(
                    pacing=w.pacing, want=w.want, left=a[0] - a[1] - a[2] - a[3], now=now, period_end=w.period_end,
                    bucket=a[4], bucket_ts=a[5] / 1000,
                )
                a[5] = now_ms
                a[3] += granted
                txn.put(lkey, _LEASE.pack(granted, now_ms + int(LEASE_S * 1000)), db=self._lease)
                out[w.campaign] = Grant(granted, self._account(a))
            for key, a in accts.items():
                self._put_acct(txn, key, a)
        return out

    def _sweep(self, txn: Any, now: float, now_ms: int) -> None:
        """Return the floats of silent workers, release timed-out reservations, forget old keys."""
        with txn.cursor(db=self._lease) as cur:
            dead = [(k, v) for k, v in cur if _LEASE.unpack(v)[1] < now_ms]
        for lkey, value in dead:
            _, campaign, period = lkey.decode().split("\0")
            key = _acct_key(campaign, int(period))
            a = self._get_acct(txn, key)
            a[3] -= _LEASE.unpack(value)[0]
            self._put_acct(txn, key, a)
            txn.delete(lkey, db=self._lease)
        limit = _EXP.pack(int(now))
        for db in (self._res, self._seenx):
            with txn.cursor(db=db) as cur:
                expired: list[bytes] = []
                for k in cur.iternext(values=False):
                    if k[:8] >= limit or len(expired) >= _SWEEP_MAX:
                        break
                    expired.append(k)
            for k in expired:
                if db is self._res:  # a second's reservations timed out: release what is left of them
                    nanos = _RES1.unpack(txn.get(k, db=db))[0]
                    a = self._get_acct(txn, k[8:])
                    a[2] -= nanos
                    a[4] += nanos
                    self._put_acct(txn, k[8:], a)
                    txn.delete(k, db=db)
                else:
                    txn.delete(k, db=db)
                    txn.delete(k[8:], db=self._seen)

    def _add_reserved(self, txn: Any, rkey: bytes, nanos: int) -> None:
        raw = txn.get(rkey, db=self._res)
        txn.put(rkey, _RES1.pack((_RES1.unpack(raw)[0] if raw is not None else 0) + nanos), db=self._res)

    def _release(self, txn: Any, bid: BidRef, nanos: int, now: float, spent: int = 0) -> None:
        """Take ``nanos`` of a bid's reservation back (it held our price, or the win's clearing
        price), unless it timed out already (the sweep released its whole second then).

        What is released and not ``spent`` goes back to the even-pacing bucket: the bucket
        is debited by spend, not by what bids reserve and then lose.
        """
        key = _acct_key(bid.campaign, bid.period)
        a = self._get_acct(txn, key)
        a[4] -= spent
        if now < bid.reserved_until:
            a[2] -= nanos
            a[4] += nanos
            self._add_reserved(txn, _EXP.pack(bid.reserved_until) + key, -nanos)
        self._put_acct(txn, key, a)

    def _held(self, txn: Any, bid: BidRef) -> int:
        """What a bid's reservation holds now: our price, or the clearing price once it won."""
        won = txn.get(f"winp:{bid.bid_id}".encode(), db=self._seen)
        return min(bid.nanos, _RES.unpack(won)[0]) if won is not None else bid.nanos

    # --- notices -----------------------------------------------------------------------

    def _first(self, txn: Any, kind: str, bid: BidRef, value: bytes = b"") -> bool:
        key = f"{kind}:{bid.bid_id}".encode()
        if txn.get(key, db=self._seen) is not None:
            return False
        txn.put(key, value or _EXP.pack(bid.expires), db=self._seen)
        txn.put(_EXP.pack(bid.expires) + key, b"", db=self._seenx)
        return True

    def commit(self, bid: BidRef, nanos: int, now: float) -> bool:
        with self.env.begin(write=True) as txn:
            if not self._first(txn, "bill", bid):
                return False
            if txn.get(f"loss:{bid.bid_id}".encode(), db=self._seen) is not None:
                held = 0  # a loss released it already (and then the exchange billed it anyway)
            else:
                held = self._held(txn, bid)
            self._release(txn, bid, held, now, spent=nanos)
            key = _acct_key(bid.campaign, bid.period)
            a = self._get_acct(txn, key)
            a[1] += nanos
            self._put_acct(txn, key, a)
        return True

    def release(self, kind: str, bid: BidRef, keep: int, now: float) -> bool:
        with self.env.begin(write=True) as txn:
            if not self._first(txn, kind, bid):
                return False
            if txn.get(f"bill:{bid.bid_id}".encode(), db=self._seen) is not None:
                return True  # billed already: the reservation is gone
            held = self._held(txn, bid)
            if kind == "loss":
                self._release(txn, bid, held, now)
            elif txn.get(f"loss:{bid.bid_id}".encode(), db=self._seen) is None:  # a win, not after a loss
                keep = min(keep, held)
                self._first(txn, "winp", bid, _RES.pack(keep, bid.expires))  # what the bill will release
                self._release(txn, bid, held - keep, now)
        return True

    def count_impression(self, bid: BidRef, keep: int, now: float) -> bool:
        with self.env.begin(write=True) as txn:
            if not bid.user or not self._first(txn, "freq", bid):
                return False
            user = bid.user.encode()
            raw = txn.get(user, db=self._freq)
            times: dict[str, list[int]] = orjson.loads(raw) if raw is not None else {}
            seen = times.get(bid.campaign, [])
            seen.append(int(now))
            times[bid.campaign] = sorted(seen)[-keep:] if keep > 0 else []
            txn.put(user, orjson.dumps(times), db=self._freq)
            self._gen[0] += 1  # under LMDB's writer lock: one writer at a time
        return True

    def first_seen(self, kind: str, bid: BidRef) -> bool:
        with self.env.begin(write=True) as txn:
            return self._first(txn, kind, bid)

    def frequency(self, user: str) -> Mapping[str, Sequence[int]]:
        """Read in a snapshot kept while no impression has been counted since (by any worker:
        a shared generation number says so) and for at most ``READ_RENEW_S``: a read
        transaction begun per bid request cost ~1.5 us of the ~2 us read."""
        now = time.monotonic()
        txn = self._read
        gen = self._gen[0]
        if txn is None or gen != self._read_gen or now - self._read_at > READ_RENEW_S:
            if txn is not None:
                txn.abort()
            txn = self._read = self.env.begin(db=self._freq)  # get(key) then: its db= argument cost ~0.2 us
            self._read_at, self._read_gen = now, gen
        raw = txn.get(user.encode())
        return orjson.loads(raw) if raw is not None else {}

    def capped_users(self, limits: Mapping[str, int], windows: Mapping[str, int], now: float, scan: int = 100_000) -> dict[str, int]:
        """Users at their cap now, per campaign (of the first ``scan`` users: a debugging view)."""
        out = dict.fromkeys(limits, 0)
        with self.env.begin() as txn, txn.cursor(db=self._freq) as cur:
            for i, value in enumerate(cur.iternext(keys=False)):
                if i >= scan:
                    break
                for cid, times in orjson.loads(value).items():
                    if cid in limits and sum(1 for t in times if t > now - windows[cid]) >= limits[cid]:
                        out[cid] += 1
        return out

    def accounts(self, period: int) -> dict[str, Account]:
        suffix = f"\0{period}".encode()
        out = {}
        with self.env.begin() as txn, txn.cursor(db=self._acct) as cur:
            for key, value in cur:
                if key.endswith(suffix):
                    out[key[: -len(suffix)].decode()] = self._account(list(_ACCT.unpack(value)))
        return out

    def flush(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        if self._read is not None:
            self._read.abort()
            self._read = None
        self._gen.release()
        self._gen_map.close()
        self.env.close()
