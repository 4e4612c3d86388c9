"""The money state: one small interface over what the workers of a node (or a fleet) share.

Units: money is integer **nanos** of the bid currency (1e-9 of a unit), so that an
impression bought at a CPM of ``p`` micros costs exactly ``p`` nanos and every sum is
exact. A campaign's account for one budget period holds:

- ``spent``: committed from billing notices (clearing prices), once per bid;
- ``reserved``: bids made and not yet billed, lost or timed out (our own price each,
  lowered to the clearing price by the win notice);
- ``floated``: budget handed to workers to bid against without asking again
  (RTBkit's slave bankers hold such a float). A float is a lease: a worker renews it at
  every ``reserve`` call; a dead worker's float comes back when its lease expires.

``spent + reserved + floated`` never exceeds the budget, so no interleaving of workers,
retries and notices spends past it; what can still pass it is a bill arriving after its
bid's reservation timed out (at most one bid's price each), which is why reservations
last long (``reservation_ttl_s``).

The calls, each one atomic step in the store:

- ``reserve``: a worker reports the bids it reserved from its floats since its last call
  and gets its new floats, sized by pacing (``tafe.money.pacing``);
- ``commit`` (bill), ``release`` (loss, or win: down to the clearing price): first time
  per bid only, whatever worker receives each retry;
- ``count_impression`` / ``frequency``: impression times per user and campaign, for caps
  (once per bid, from the first of its win, bill and impression notices);
- ``first_seen``: idempotency of the notices that move no money (impression, click);
- ``accounts``: totals for /metrics and /debug/campaigns.

Idempotency keys ("first seen") live as long as a notice token is valid, then go: a
token older than that is refused as expired, so forgetting its key forgets no bill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = ["LEASE_S", "Account", "BidRef", "Grant", "Reservation", "Reserved", "State", "Want"]

LEASE_S = 5.0  # a float's lease: a worker silent this long has its floats returned to the budget


class Reservation(NamedTuple):
    """A bid reserved from a worker's float: ``nanos`` is our price for one impression.

    ``reserve`` takes these or plain tuples of the same fields in the same order
    (``Reserved``): the banker makes one per bid, and a plain tuple costs half as much."""

    bid_id: str
    campaign: str
    period: int
    nanos: int
    expires: int  # unix seconds: released then unless billed, lost or won first


Reserved = tuple[str, str, int, int, int]  # a Reservation's fields, in its order


@dataclass(frozen=True, slots=True)
class Want:
    """What a worker asks for one budgeted campaign at a ``reserve`` call."""

    campaign: str
    period: int
    period_end: int  # unix seconds
    budget: int  # nanos for the period
    pacing: str  # "even" or "asap"
    want: int  # nanos of float it would like to hold until its next call


@dataclass(frozen=True, slots=True)
class Account:
    """One campaign's money in one period, as the store holds it (nanos)."""

    budget: int = 0
    spent: int = 0
    reserved: int = 0
    floated: int = 0
    rate: int = 0  # even pacing: nanos per second allowed now (0 for asap)

    @property
    def left(self) -> int:
        return self.budget - self.spent - self.reserved - self.floated


@dataclass(frozen=True, slots=True)
class Grant:
    """A worker's float for one campaign until its next ``reserve`` call, and the account after it."""

    nanos: int
    account: Account


@dataclass(frozen=True, slots=True)
class BidRef:
    """A bid as a notice names it (from its verified token)."""

    bid_id: str
    campaign: str
    period: int
    nanos: int  # our price: what its reservation held
    user: str = ""
    expires: int = 0  # unix seconds until which its notice token is valid (idempotency keys live as long)
    reserved_until: int = 0  # unix seconds when its reservation times out: the bid's time + reservation_ttl_s


class State(Protocol):
    """The shared money state (embedded LMDB for one node: ``tafe.money.embedded``)."""

    def reserve(self, worker: str, used: Sequence[Reserved], wants: Sequence[Want], now: float) -> dict[str, Grant]:
        """Record ``used``, return this worker's new float per campaign (keyed by campaign id)."""
        ...

    def commit(self, bid: BidRef, nanos: int, now: float) -> bool:
        """Spend ``nanos`` for a billed bid and release its reservation; False if already billed."""
        ...

    def release(self, kind: str, bid: BidRef, keep: int, now: float) -> bool:
        """A ``loss`` (keep 0) or ``win`` (keep the clearing price) for a bid; False if seen before."""
        ...

    def count_impression(self, bid: BidRef, keep: int, now: float) -> bool:
        """Count an impression of ``bid.campaign`` for ``bid.user`` once per bid (``keep``: times kept per user)."""
        ...

    def first_seen(self, kind: str, bid: BidRef) -> bool:
        """True the first time (``kind``, bid) is seen (impression and click notices)."""
        ...

    def frequency(self, user: str) -> Mapping[str, Sequence[int]]:
        """The user's recent impression times (unix seconds) by campaign."""
        ...

    def accounts(self, period: int) -> dict[str, Account]:
        """Every campaign's account in ``period``."""
        ...

    def capped_users(self, limits: Mapping[str, int], windows: Mapping[str, int], now: float) -> dict[str, int]:
        """How many users are at their cap now, per campaign (for /debug/campaigns)."""
        ...

    def flush(self) -> None:
        """Make what is committed durable (the store may delay it for speed)."""
        ...

    def close(self) -> None: ...
