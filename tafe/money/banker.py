"""A worker's banker: the floats it bids against, and the reservations it owes the store.

The bid path never waits on the store: ``decide`` reads ``floats`` (a plain dict) and
returns the bids it reserved, ``apply`` takes them off the floats and queues them, and
``sync`` (about once a second, or sooner when a float runs short) reports the queue to
the shared state and takes new floats in one ``State.reserve`` call. A float is the
most this worker may reserve for a campaign until its next sync; the state sizes it by
pacing and by what is left, so the workers of a node together never hold more than the
budget. A float lasts as long as its lease in the state: a worker that cannot sync (the
state gone) stops bidding from it before the state hands it to others. Not thread-safe: one per worker process, used from its event loop.
"""

from __future__ import annotations

from collections.abc import Iterable

from tafe.core.campaigns import Campaign
from tafe.core.types import Decision
from tafe.money.state import LEASE_S, Account, Reserved, State, Want

__all__ = ["Banker", "period_of"]

NANOS_PER_MICRO = 1000
FLOAT_TRUST_S = LEASE_S - 1.0  # a float is used only while its lease surely still holds


def period_of(ts: float, period_s: int) -> int:
    """The budget period holding unix time ``ts``: periods start at multiples of ``period_s``."""
    return int(ts // period_s)


class Banker:
    def __init__(self, campaigns: Iterable[Campaign], *, worker: str, period_s: int, reservation_ttl_s: int) -> None:
        self.budgeted = {c.id: c for c in campaigns if c.budget_micros > 0}
        self.worker = worker
        self.period_s = period_s
        self.reservation_ttl_s = reservation_ttl_s
        self.floats: dict[str, int] | None = {} if self.budgeted else None  # what decide reads
        self.exhausted: frozenset[str] = frozenset()
        self.accounts: dict[str, Account] = {}  # as of the last sync
        self.short = False  # a bid was refused for want of float: sync soon
        self.period = -1  # the budget period the floats were granted for
        self.synced_at = 0.0  # unix time of the last successful sync
        self._fresh_from = self._stale_at = 0.0  # when the floats may be bid on (see ``sync``)
        self.failures = 0  # syncs failed in a row since then
        self._granted: dict[str, int] = {}  # the floats as granted at the last sync
        # Per decision that reserved: (its time, its reservations), all in ``period``; made
        # into reservations (``Reserved``) at the sync, not per bid (one append per bid request here).
        self._queue: list[tuple[float, tuple[tuple[str, str, int], ...]]] = []

    def floats_at(self, now: float) -> dict[str, int] | None:
        """The floats ``decide`` may bid against now: none left once their period or their lease is over
        (a second short of it: the state may sweep a lease by another node's clock)."""
        floats = self.floats
        if floats is not None and not self._fresh_from <= now < self._stale_at:
            # A new period, or the state unreachable for so long that our lease may have
            # expired there and the float been handed to another worker: bid on nothing.
            # (``self.floats`` stays: granted less it is what was used, told at the next sync.)
            self.short = True
            return dict.fromkeys(floats, 0)
        return floats

    def apply(self, decision: Decision, now: float) -> None:
        """Take a decision's reservations off the floats and queue them for the store."""
        floats = self.floats
        if floats is None or not decision.reservations:
            return
        for campaign, _, nanos in decision.reservations:
            floats[campaign] -= nanos
        # floats_at has just checked that the floats are ``self.period``'s, which changes only
        # at a sync, which empties the queue.
        self._queue.append((now, decision.reservations))

    def sync(self, state: State, now: float, *, final: bool = False) -> None:
        """Report the queued reservations, take new floats (one ``State.reserve`` call).

        ``final``: the worker is stopping: report, and give every float back.
        """
        floats = self.floats
        if floats is None:
            return
        pending, self._queue = self._queue, []
        old, ttl = self.period, self.reservation_ttl_s
        queue: list[Reserved] = [(bid_id, c, old, nanos, int(t) + ttl) for t, made in pending for c, bid_id, nanos in made]
        used = {c: granted - floats.get(c, 0) for c, granted in self._granted.items()}  # since the last good sync
        period = period_of(now, self.period_s)
        end = (period + 1) * self.period_s
        wants = [
            Want(
                campaign=c.id, period=period, period_end=end, budget=c.budget_micros * NANOS_PER_MICRO, pacing=c.pacing,
                # Twice what it used since the last sync; at least a hundredth of the budget
                # and room for a few bids at its top price (pacing may grant less).
                want=0 if final else max(
                    2 * used.get(c.id, 0), 4 * c.max_cpm_micros, c.budget_micros * NANOS_PER_MICRO // 100
                ),
            )
            for c in self.budgeted.values()
        ]
        try:
            grants = state.reserve(self.worker, queue, wants, now)
        except Exception:
            self._queue = pending + self._queue  # keep them for the next try; floats stay as they are
            self.failures += 1
            raise
        self.failures = 0
        self.period = period
        self.synced_at = now
        # The floats hold from the start of their period until it ends or their lease may
        # have expired, whichever is first: one comparison per bid request.
        self._fresh_from = period * self.period_s
        self._stale_at = min((period + 1) * self.period_s, now + FLOAT_TRUST_S)
        self.floats = {cid: g.nanos for cid, g in grants.items()}
        self._granted = dict(self.floats)
        self.accounts = {cid: g.account for cid, g in grants.items()}
        # Less left than one impression at the campaign's top price, floats aside: a bid
        # refused now is refused for "budget"; otherwise pacing holds the rest for later.
        self.exhausted = frozenset(
            cid for cid, g in grants.items()
            if g.account.budget - g.account.spent - g.account.reserved < self.budgeted[cid].max_cpm_micros
        )
        self.short = False
