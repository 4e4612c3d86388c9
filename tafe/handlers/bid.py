"""The bid endpoint: HTTP concerns around ``parse -> decide -> render``.

Everything about HTTP lives here (body limits, gzip both ways, the version header, the
deadline, status codes); the bidding itself is the pure core. Client input never
causes a 5xx: a malformed request is a 400 with a short reason, counted by reason.
"""

from __future__ import annotations

import logging
import re
import time
import zlib
from functools import partial
from typing import Any

from xxhash import xxh3_64_hexdigest

from tafe.core.campaigns import Campaigns
from tafe.core.decide import Inputs, decide, no_bid
from tafe.core.privacy import may_use_history
from tafe.core.render import render
from tafe.core.request import BadRequest, parse
from tafe.core.types import BidRequest, Decision, NoBidReason
from tafe.exchanges import Exchanges, Profile
from tafe.metrics import Metrics
from tafe.money.banker import Banker
from tafe.money.state import State
from tafe.money.token import Keys, NoticeFields, sign
from tafe.settings import Settings

log = logging.getLogger("tafe.bid")

Response = tuple[str, list[tuple[str, str]], bytes]

_JSON = ("Content-Type", "application/json")
_TEXT = ("Content-Type", "text/plain; charset=utf-8")
_SPOKEN = ("2.5", "2.6")
_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](:[0-9]{1,5})?").fullmatch


class TooLarge(Exception):
    """The body (on the wire or inflated) is above its cap: 413."""


def read_body(environ: dict[str, Any], max_bytes: int) -> bytes:
    """The request body, refusing more than ``max_bytes`` without reading it all (a
    server's fast path hands it over whole, as ``tafe.body``: ``tafe.http.direct_environ``)."""
    given: bytes | None = environ.get("tafe.body")
    if given is not None:
        if len(given) > max_bytes:
            raise TooLarge()
        return given
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    if length:
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            raise BadRequest("bad_content_length")
        if n > max_bytes:
            raise TooLarge()
        return bytes(stream.read(n)) if n else b""
    body: bytes = stream.read(max_bytes + 1)  # chunked or unknown length: the server terminated the stream
    if len(body) > max_bytes:
        raise TooLarge()
    return body


MAX_GZIP_MEMBERS = 64


def inflate(body: bytes, max_bytes: int) -> bytes:
    """Gunzip with a hard cap: a gzip bomb stops at ``max_bytes`` + 1, never exhausting
    memory. Concatenated members are one body (RFC 1952); bytes after the last member
    that are not one are refused rather than dropped, except zero padding."""
    parts: list[bytes] = []
    room = max_bytes
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(body, room + 1)
        except zlib.error:
            raise BadRequest("bad_gzip") from None
        if len(out) > room or d.unconsumed_tail:
            raise TooLarge()
        if not d.eof:
            raise BadRequest("bad_gzip")  # truncated stream
        body = d.unused_data
        if not parts and not body:
            return out  # the usual case: one member
        parts.append(out)
        room -= len(out)
        if not body.strip(b"\0"):
            return b"".join(parts)
        if len(parts) >= MAX_GZIP_MEMBERS:  # thousands of tiny members: CPU, not data
            raise BadRequest("bad_gzip")


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether ``Accept-Encoding`` allows gzip: listed (or ``*``) without ``q=0`` (RFC 9110 12.5.3)."""
    value = accept_encoding.lower()
    if ";" not in value:  # the usual "gzip, deflate, br": no weights to read
        return "gzip" in value or "*" in value
    star = False
    for item in value.split(","):
        coding, _, params = item.partition(";")
        coding, q = coding.strip(), 1.0
        for param in params.split(";"):
            name, _, weight = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(weight)
                except ValueError:
                    q = 0.0
        if coding == "gzip" or coding == "x-gzip":
            return q > 0
        if coding == "*":
            star = q > 0
    return star


class BidHandler:
    """``POST /openrtb2/bid[/{exchange}]`` -> (status, headers, body)."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics,
        holder: Any,
        campaigns: Campaigns,
        banker: Banker,
        state: State,
        keys: Keys,
        exchanges: Exchanges,
        decision_log: Any = None,
    ) -> None:
        self.metrics = metrics
        self.holder = holder
        self.campaigns = campaigns
        self.banker = banker
        self.state = state
        self.keys = keys
        self.exchanges = exchanges
        self.caps = {c.id: c.frequency_cap for c in campaigns.campaigns if c.frequency_cap is not None}
        self.decision_log = decision_log
        self.max_body = settings.max_body_bytes
        self.max_inflated = settings.max_inflated_bytes
        self.gzip_min = settings.gzip_min_bytes
        self.default_tmax = settings.default_tmax_ms
        self.max_tmax = settings.max_tmax_ms
        self.min_budget = settings.min_budget_ms / 1000
        self.nbr = settings.nbr_in_response
        self.gvl_vendor_id = settings.gvl_vendor_id
        self._bases: dict[tuple[str, str | None], str] = {}
        self.debug = log.isEnabledFor(logging.DEBUG)
        self._bids: dict[str, Any] = {}  # prometheus children per exchange, bound once
        self._no_bids = {r: metrics.updates.counter(metrics.no_bids.labels(r.label)) for r in NoBidReason}
        self._bid_price = metrics.updates.histogram(metrics.bid_price)
        self._bad: dict[str, Any] = {}
        self._warned_at = -10.0  # monotonic time of the last "state unreadable" warning
        self._privacy: dict[tuple[str, str], Any] = {}

    def _base_of(self, environ: dict[str, Any]) -> str:
        """``scheme://host[:port]`` the exchange reached us by (Nginx passes the Host through,
        and the scheme as ``X-Forwarded-Proto``: https when it terminates TLS).

        Used when no notice base URL is configured: the listening port is not known
        before binding (port 0) and the public one is Nginx's anyway.
        """
        key = (environ.get("HTTP_HOST", ""), environ.get("HTTP_X_FORWARDED_PROTO"))
        base = self._bases.get(key)
        if base is None:
            host, scheme = key
            if not _HOST(host):
                host = f"{environ.get('SERVER_NAME', '127.0.0.1')}:{environ.get('SERVER_PORT', '80')}"
            if scheme not in ("http", "https"):
                scheme = environ.get("wsgi.url_scheme", "http")
            base = f"{scheme}://{host}"
            if len(self._bases) < 64:  # a few real hosts; a client inventing Host values is not cached
                self._bases[key] = base
        return base

    def _bad_request(self, reason: str) -> Response:
        counter = self._bad.get(reason)
        if counter is None:
            # reasons are a small closed set from parse(); ":<path>" suffixes only name fields TAFE reads
            counter = self._bad[reason] = self.metrics.bad_requests.labels(reason)
        counter.inc()
        if self.debug:
            log.debug("bad request: %s", reason)
        return "400 Bad Request", [_TEXT], reason.encode() + b"\n"

    def _count_privacy(self, decision: Decision) -> None:
        key = ("no_bid" if decision.no_bid is NoBidReason.PRIVACY else "no_history", decision.privacy or "")
        counter = self._privacy.get(key)
        if counter is None:  # reasons are a fixed set of labels from tafe.core.privacy
            counter = self._privacy[key] = self.metrics.updates.counter(self.metrics.privacy.labels(*key))
        counter.inc()

    def _no_bid(self, request_id: str, reason: NoBidReason, exchange: str, headers: list[tuple[str, str]]) -> Response:
        self._no_bids[reason].inc()
        if self.debug:
            log.debug("no bid: %s", reason.label, extra={"fields": {"request": request_id, "exchange": exchange}})
        if self.nbr:
            return "200 OK", [_JSON, *headers], render(no_bid(request_id, reason), seat="", notice_base="", nbr_in_response=True)
        return "204 No Content", headers, b""

    def _impressions(self, user: str, now: float) -> dict[str, int] | None:
        """The user's impressions per capped campaign within its window; None for no usable user or none counted."""
        if not user:
            return None
        try:
            times = self.state.frequency(user)
        except Exception as exc:  # state unreadable: count every capped campaign as at its cap
            self.metrics.money_errors.labels("frequency").inc()
            if time.monotonic() - self._warned_at >= 10:  # not per request: counted in /metrics
                self._warned_at = time.monotonic()
                log.warning("money state unreadable: capped campaigns do not bid until it is back (%s)", exc)
            return {cid: cap.impressions for cid, cap in self.caps.items()}
        if not times:  # the common case: no impression counted for this user
            return None
        out = {}
        for cid, seen in times.items():
            cap = self.caps.get(cid)
            if cap is not None:
                since = now - cap.window_s
                out[cid] = sum(1 for t in seen if t > since)
        return out

    def _tokens(self, request: BidRequest, decision: Decision, user: str, ts: int, exchange: str) -> list[str]:
        model, keys = decision.versions.get("model", ""), self.keys
        return [
            sign(
                NoticeFields(
                    request.id, b.imp_id, b.bid_id, b.campaign_id, b.creative.id, user, b.price_micros, ts, model, b.deal_id,
                    exchange, request.at, b.context, b.value_micros,
                ),
                keys,
            )  # fmt: skip
            for b in decision.bids
        ]

    def __call__(self, environ: dict[str, Any], exchange: str) -> Response:
        arrival = environ.get("tafe.arrival") or time.monotonic()
        version = environ.get("HTTP_X_OPENRTB_VERSION", "")
        headers = [("x-openrtb-version", version if version in _SPOKEN else "2.6")]
        try:
            body = read_body(environ, self.max_body)
            encoding = environ.get("HTTP_CONTENT_ENCODING", "")
            if encoding:
                encoding = encoding.strip().lower()
                if encoding == "gzip" or encoding == "x-gzip":
                    body = inflate(body, self.max_inflated)
                elif encoding != "identity":
                    self.metrics.bad_requests.labels("unsupported_encoding").inc()
                    return "415 Unsupported Media Type", [_TEXT], b"unsupported_encoding\n"
            request = parse(body)
        except TooLarge:
            self.metrics.bad_requests.labels("too_large").inc()
            return "413 Payload Too Large", [_TEXT], b"too_large\n"
        except BadRequest as exc:
            return self._bad_request(exc.reason)

        profile: Profile = self.exchanges.of(exchange)
        tmax = request.tmax or self.default_tmax
        deadline = arrival + (min(tmax, self.max_tmax) - profile.network_margin_ms) / 1000
        if deadline - time.monotonic() < self.min_budget:
            self.metrics.over_deadline.inc()
            return self._no_bid(request.id, NoBidReason.DEADLINE, exchange, headers)

        snapshot = self.holder.current
        now = time.time()
        vendor = self.gvl_vendor_id
        user = xxh3_64_hexdigest(request.user_keys[0].encode()) if request.user_keys and may_use_history(request, vendor) is None else ""
        banker = self.banker
        inputs = Inputs(
            snapshot, self.campaigns, now, budgets=banker.floats_at(now), exhausted=banker.exhausted,
            impressions=partial(self._impressions, user, now) if self.caps and user else None, seat=profile.seat,
            gvl_vendor_id=vendor, shading=snapshot.shading, exchange=profile.name,
        )  # fmt: skip
        decision = decide(request, inputs)
        if decision.privacy is not None:
            self._count_privacy(decision)
        if self.decision_log is not None:
            self.decision_log.record(request, decision, snapshot, now)
        if not decision.bids:
            if decision.no_bid is NoBidReason.PACING or decision.no_bid is NoBidReason.BUDGET:
                banker.short = True  # a float ran short: the sync loop tops it up soon
            return self._no_bid(request.id, decision.no_bid or NoBidReason.NO_ELIGIBLE_CAMPAIGN, exchange, headers)
        if time.monotonic() > deadline:  # before reserving: a late bid costs nothing
            self.metrics.over_deadline.inc()
            return self._no_bid(request.id, NoBidReason.DEADLINE, exchange, headers)
        banker.apply(decision, now)
        out = render(
            decision, seat=profile.seat, notice_base=profile.notice_base_url or self._base_of(environ),
            tokens=self._tokens(request, decision, user, int(now), profile.name),
        )  # fmt: skip

        counter = self._bids.get(exchange)
        if counter is None:
            counter = self._bids[exchange] = self.metrics.updates.counter(self.metrics.bids.labels(exchange))
        counter.inc(len(decision.bids))
        observe = self._bid_price.observe
        for bid in decision.bids:
            observe(bid.price)
        headers.append(_JSON)
        if profile.gzip and len(out) >= self.gzip_min and accepts_gzip(environ.get("HTTP_ACCEPT_ENCODING", "")):
            out = zlib.compress(out, 1, wbits=31)
            headers.append(("Content-Encoding", "gzip"))
            headers.append(("Vary", "Accept-Encoding"))
        return "200 OK", headers, out

