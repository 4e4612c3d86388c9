"""Notices and tracking: ``/notice/{win,bill,loss}`` and ``/track/{imp,click}``, each ``?t=<token>``.

Every URL was written by TAFE at render time with a signed token (``tafe.money.token``)
that holds the whole bid, so a notice needs no per-bid state to be understood, and a
forged or altered one is refused before it can touch money. Rules, in order:

1. The token must verify (``unsigned``, ``bad_token``: 403; ``expired``: 410).
2. Win and bill need the clearing price ``p`` (``${AUCTION_PRICE}``): a plain number,
   or one the exchange encrypted (``tafe.money.price_crypto``) with the keys of its
   profile (``tafe.exchanges``; the token names the exchange), at least 0 and at most our
   own bid price, in our currency (``cur``, when filled in). Anything else is
   ``bad_price`` (400); an encrypted price whose signature fails is ``bad_signature``
   (400); one from an exchange without keys is logged and counted as ``encrypted_price``
   and changes nothing (202).
3. The money state applies it once per bid, whichever worker gets each retry:
   bill (or win, when the exchange's ``spend_on`` is ``win``) commits the price as spend
   and releases the bid's reservation; win lowers the reservation to the clearing price;
   loss releases it.
   A second time is ``duplicate`` (still 204: the exchange must stop retrying).
4. The first of win, bill and impression counts one impression of the campaign for the
   user (frequency caps). A click answers 302 to the campaign's declared ``landing_url``,
   never to a URL taken from the request.

Every outcome is counted in ``tafe_notices_total{kind,outcome}`` and every accepted or
duplicate notice goes to the event sink. If the money state fails (Redis gone), the notice
is kept in the worker's ``NoticeQueue`` and applied by its money loop when the state is
back (``queued``: answered as if accepted); with the queue full, the answer is 503
(``state_error``) so the exchange retries later.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from tafe.core.campaigns import Campaigns
from tafe.events import EventSink
from tafe.exchanges import Exchanges
from tafe.metrics import Metrics
from tafe.money.banker import period_of
from tafe.money.price_crypto import PriceError, PriceKeys, decrypt
from tafe.money.state import BidRef, State
from tafe.money.token import Keys, NoticeFields, verify

log = logging.getLogger("tafe.notice")

KINDS = ("win", "bill", "loss")
TRACKS = ("imp", "click")
OUTCOMES = (
    "accepted", "duplicate", "queued", "unsigned", "bad_token", "expired", "bad_price", "bad_signature",
    "encrypted_price",
    "unknown_campaign", "state_error",
)  # fmt: skip
Response = tuple[str, list[tuple[str, str]], bytes]

_MAX_QUERY = 4096
_TEXT = ("Content-Type", "text/plain; charset=utf-8")
_NO_STORE = ("Cache-Control", "no-store")
_STATUS = {
    "unsigned": "403 Forbidden", "bad_token": "403 Forbidden", "expired": "410 Gone", "bad_price": "400 Bad Request",
    "bad_signature": "400 Bad Request", "encrypted_price": "202 Accepted", "unknown_campaign": "404 Not Found",
    "state_error": "503 Service Unavailable",
}  # fmt: skip
# A 1x1 transparent GIF: what an <img> impression pixel expects back.
PIXEL = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00"
    b",\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)


def clearing_nanos(text: str, bid_price_micros: int, currency: str, ours: str, keys: PriceKeys | None = None) -> int | str:
    """The clearing price of one impression in nanos (CPM micros), or why it is refused;
    ``keys``: the exchange's, to decrypt an encrypted price."""
    if currency and not currency.startswith("${") and currency.upper() != ours:
        return "bad_price"
    if not text or text.startswith("${") or text.startswith("%24%7B"):
        return "bad_price"  # missing, or a macro the exchange did not fill in
    try:
        value = Decimal(text)
    except InvalidOperation:
        # Not a number: exchanges that encrypt send base64url ciphertext here.
        if len(text) < 16 or not text.rstrip("=").replace("-", "").replace("_", "").isalnum():
            return "bad_price"
        if keys is None:
            return "encrypted_price"
        try:
            micros = decrypt(text, keys)
        except PriceError as exc:
            return exc.reason
        return micros if micros <= bid_price_micros else "bad_price"
    if not value.is_finite() or value < 0:
        return "bad_price"
    micros = int((value * 1_000_000).to_integral_value(rounding="ROUND_HALF_UP"))
    return micros if micros <= bid_price_micros else "bad_price"


class NoticeQueue:
    """How a notice moves money, and the notices the state could not take yet (a worker's own, bounded).

    Applying a notice again is harmless (the state counts each bid once), so a notice
    queued while the state was gone is applied whole when it is back, in arrival order.
    """

    def __init__(self, *, limit: int = 50_000) -> None:
        self.limit = limit
        self.items: deque[tuple[str, BidRef, int, float, int, str]] = deque()

    @staticmethod
    def apply(state: State, kind: str, bid: BidRef, price: int, now: float, cap: int, spend_on: str) -> bool:
        """Apply one notice to ``state`` (``cap``: impressions kept per user, 0 for none; ``spend_on``: the
        exchange's billing notice, bill or win); False if seen before."""
        if kind == "bill" or (kind == "win" and spend_on == "win"):
            first = state.commit(bid, price, now)
        elif kind in ("win", "loss"):
            first = state.release(kind, bid, price, now)
        else:
            first = state.first_seen(kind, bid)
        if kind != "loss" and kind != "click" and cap and bid.user:
            state.count_impression(bid, cap, now)
        return first

    def put(self, kind: str, bid: BidRef, price: int, now: float, cap: int, spend_on: str) -> bool:
        """Keep a notice for later; False when the queue is full."""
        if len(self.items) >= self.limit:
            return False
        self.items.append((kind, bid, price, now, cap, spend_on))
        return True

    def drain(self, state: State) -> int:
        """Apply the kept notices in order until one fails (it stays first); how many were applied."""
        n = 0
        while self.items:
            self.apply(state, *self.items[0])
            self.items.popleft()
            n += 1
        return n


class NoticeHandler:
    """``(environ, kind) -> (status, headers, body)`` for notice kinds and tracking kinds."""

    def __init__(
        self,
        *,
        metrics: Metrics,
        campaigns: Campaigns,
        state: State,
        keys: Keys,
        events: EventSink,
        notice_ttl_s: int,
        reservation_ttl_s: int,
        period_s: int,
        exchanges: Exchanges,
        queue: NoticeQueue | None = None,
    ) -> None:
        self.campaigns = campaigns
        self.state = state
        self.keys = keys
        self.events = events
        self.ttl = notice_ttl_s
        self.reservation_ttl = reservation_ttl_s
        self.period_s = period_s
        self.exchanges = exchanges
        self.queue = queue or NoticeQueue()
        self.metrics = metrics
        self._counters: dict[tuple[str, str], Any] = {}
        self._log_budget = _LogBudget()
        self.debug = log.isEnabledFor(logging.DEBUG)  # read once: notices are counted, logged only when debugging

    def _count(self, kind: str, outcome: str) -> None:
        counter = self._counters.get((kind, outcome))
        if counter is None:
            counter = self._counters[(kind, outcome)] = self.metrics.updates.counter(self.metrics.notices.labels(kind, outcome))
        counter.inc()

    def __call__(self, environ: dict[str, Any], kind: str) -> Response:
        now = time.time()
        query = dict(parse_qsl(environ.get("QUERY_STRING", "")[:_MAX_QUERY], keep_blank_values=True))
        fields = verify(query.get("t", ""), self.keys, now, self.ttl)
        if isinstance(fields, str):
            return self._refuse(kind, fields, query)
        campaign = self.campaigns.by_id.get(fields.campaign)
        if campaign is None or (kind == "click" and not campaign.landing_url):  # e.g. a campaign since removed
            return self._refuse(kind, "unknown_campaign", query, fields)
        bid = BidRef(
            bid_id=fields.bid_id, campaign=fields.campaign, period=period_of(fields.ts, self.period_s),
            nanos=fields.price_micros, user=fields.user, expires=fields.ts + self.ttl,
            reserved_until=fields.ts + self.reservation_ttl,
        )
        profile = self.exchanges.of(fields.exchange)
        price = 0
        if kind in ("win", "bill"):
            cleared = clearing_nanos(
                query.get("p", ""), fields.price_micros, query.get("cur", ""), self.campaigns.currency, profile.price_keys
            )
            if isinstance(cleared, str):
                return self._refuse(kind, cleared, query, fields)
            price = cleared
        cap = campaign.frequency_cap.impressions if campaign.frequency_cap is not None else 0
        notice = (kind, bid, price, now, cap, profile.spend_on)
        try:
            outcome = "accepted" if self.queue.apply(self.state, *notice) else "duplicate"
        except Exception as exc:
            if not self.queue.put(*notice):
                log.error("money state failed on a %s notice for bid %s and the queue is full: %s", kind, fields.bid_id, exc)
                self._count(kind, "state_error")
                return _STATUS["state_error"], [_TEXT], b"state_error\n"
            if len(self.queue.items) == 1:  # the first one kept: once per outage
                log.warning("money state failed on a %s notice: notices are kept to apply when it is back (%s)", kind, exc)
            outcome = "queued"
        self._count(kind, outcome)
        event = _event(kind, outcome, fields, now, query, price)
        self.events.emit(event)
        if self.debug:
            log.debug("notice %s %s", kind, outcome, extra={"fields": event})
        if kind == "click":
            return "302 Found", [("Location", campaign.landing_url), _NO_STORE], b""
        if kind == "imp":
            return "200 OK", [("Content-Type", "image/gif"), _NO_STORE], PIXEL
        return "204 No Content", [], b""

    def _refuse(self, kind: str, reason: str, query: dict[str, str], fields: NoticeFields | None = None) -> Response:
        self._count(kind, reason)
        if self._log_budget.take():
            log.info(
                "%s notice refused: %s", kind, reason,
                extra={"fields": {"kind": kind, "outcome": reason, "bid": fields.bid_id if fields else "",
                                  "price": query.get("p", "")[:64]}},
            )  # fmt: skip
        if reason == "encrypted_price" and fields is not None:
            self.events.emit(_event(kind, reason, fields, time.time(), query, 0))
        return _STATUS[reason], [_TEXT], reason.encode() + b"\n"


def _event(kind: str, outcome: str, f: NoticeFields, now: float, query: dict[str, str], price: int | str) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": kind, "outcome": outcome, "ts": round(now, 3), "bid_ts": f.ts, "request_id": f.request_id,
        "imp_id": f.imp_id, "bid_id": f.bid_id, "campaign": f.campaign, "creative": f.creative, "user": f.user,
        "bid_price": f.price_micros / 1e6, "model": f.model,
    }  # fmt: skip
    if f.deal:
        event["deal"] = f.deal
    if f.exchange:
        event["exchange"] = f.exchange
    if f.context:  # a first-price open-auction bid: what shading learns from (tafe.cqs.offline.shading)
        event["at"], event["context"], event["value"] = f.auction, f.context, f.value_micros / 1e6
    if kind in ("win", "bill"):
        event["price"] = price / 1e6 if isinstance(price, int) else None
        if outcome == "encrypted_price":
            event["price_raw"] = query.get("p", "")[:256]
    if kind == "loss":
        event["loss"] = query.get("l", "")[:16]
    if kind in ("win", "loss"):
        mtw = query.get("mtw", "")
        if mtw and not mtw.startswith("${") and not mtw.startswith("%24%7B"):
            event["min_to_win"] = mtw[:32]
    return event


class _LogBudget:
    """At most ``per_s`` log lines a second for refused notices: a forger cannot flood the log."""

    def __init__(self, per_s: int = 10) -> None:
        self.per_s = per_s
        self._second = 0
        self._n = 0

    def take(self) -> bool:
        second = int(time.monotonic())
        if second != self._second:
            self._second, self._n = second, 0
        self._n += 1
        return self._n <= self.per_s
