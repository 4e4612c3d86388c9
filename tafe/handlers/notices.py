"""Win, billing and loss notices: ``GET`` or ``POST /notice/{win,bill,loss}?<state>``.

The URLs were written by ``tafe.core.render`` and carry their own state (request,
imp and bid ids, campaign, creative, model version, our price), so nothing is kept
per bid. Each notice is counted in ``/metrics`` and becomes one ``tafe.notice`` log
line at debug level (``--log-level debug``), with its fields, for the training join.
Billing notices are retried by exchanges until they get a 200/204, so they are
deduplicated on (request, imp, bid) in a bounded set. ``${AUCTION_PRICE}`` is often
encrypted by the exchange: a price that is not a number is kept as text, not refused.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import parse_qsl

from tafe.metrics import Metrics

log = logging.getLogger("tafe.notice")

KINDS = ("win", "bill", "loss")
_FIELDS = {"r": "request", "i": "imp", "b": "bid", "c": "campaign", "cr": "creative", "m": "model", "bp": "bid_price",
           "d": "deal", "p": "price", "cur": "currency", "l": "loss"}
_MAX_QUERY = 4096


class Dedupe:
    """A bounded set remembering the most recent keys (oldest forgotten first).

    Locked so that threaded WSGI servers may share it too (a gevent lock once patched).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, key: tuple) -> bool:
        """True the first time a key is seen (while remembered)."""
        with self._lock:
            seen = self._seen
            if key in seen:
                seen.move_to_end(key)
                return False
            seen[key] = None
            if len(seen) > self.size:
                seen.popitem(last=False)
            return True


def _price(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value >= 0 and value != float("inf") else None


class NoticeHandler:
    """Counts and logs a notice; the answer is always an empty 204 (the spec allows 200 or 204)."""

    def __init__(self, metrics: Metrics, *, dedupe_size: int = 100_000) -> None:
        self.bills = Dedupe(dedupe_size)
        self._counters = {k: metrics.updates.counter(metrics.notices.labels(k)) for k in (*KINDS, "bill_duplicate")}

    def __call__(self, environ: dict[str, Any], kind: str) -> tuple[str, list[tuple[str, str]], bytes]:
        query = environ.get("QUERY_STRING", "")[:_MAX_QUERY]
        fields: dict[str, Any] = {}
        for key, value in parse_qsl(query, keep_blank_values=True):
            name = _FIELDS.get(key)
            if name is not None:
                fields[name] = value[:256]
        if "price" in fields:
            price = _price(fields["price"])
            if price is None:
                fields["price_raw"] = fields.pop("price")  # encrypted or unsubstituted macro
            else:
                fields["price"] = price
        if kind == "bill" and not self.bills.first((fields.get("request"), fields.get("imp"), fields.get("bid"))):
            kind = "bill_duplicate"
        self._counters[kind].inc()
        fields["kind"] = kind
        log.debug("notice %s", kind, extra={"fields": fields})  # counted in /metrics; debug for the training join
        return "204 No Content", [], b""
