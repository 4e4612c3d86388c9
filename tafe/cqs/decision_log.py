"""The decision log: a sampled JSON-lines record of bids, with what training needs.

One line per bid of a sampled decision (sampling is per request, so all bids of a
request are kept or dropped together)::

    {"ts": 1767225600.123, "request_id": "...", "imp_id": "1", "bid_id": "...",
     "campaign": "...", "price": 1.25, "cur": "USD", "cqs": 0.31, "known": false,
     "model": "demo-1", "store": "", "spec": "tafe-cqs-features/1",
     "features": ["ch=site", "inv=example.com", ...]}

Joined later with win, impression and click notices (by request, imp and bid id) into
``"outcomes": {"visit": 0|1, "click": 0|1, ...}``, these lines are what ``tafe cqs
train`` reads. Decisions without bids are not logged: nothing was shown, so nothing
can be learned. Requests whose user must not be profiled (COPPA, or GDPR without a
consent string) are not logged either.

A decision's lines go out in one ``write(2)`` on an ``O_APPEND`` descriptor, so lines
from several pre-forked workers sharing the file never interleave. A failing write is
counted in ``errors`` and dropped: the log never fails a bid.
"""

from __future__ import annotations

import os
import random

import orjson

from tafe.core.types import BidRequest, Decision
from tafe.cqs import Snapshot
from tafe.cqs.features import SPEC
from tafe.events import EventSink


class DecisionLog:
    """Sampled decisions to a file (``path``), to the event sink as ``"event": "decision"``
    records (``events``: the node's ``--event-log``, beside its wins, bills and clicks), or both."""

    def __init__(self, path: str | None, sample: float, seed: int | None = None, events: EventSink | None = None) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"decision log sample must be within 0..1, got {sample}")
        self.path = path
        self.sample = sample
        self.events = events
        self.written = 0
        self.errors = 0
        self._random = random.Random(seed).random
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o644) if path else -1

    def record(self, request: BidRequest, decision: Decision, snapshot: Snapshot, now: float) -> None:
        if not decision.bids or (self._fd < 0 and self.events is None) or self._random() >= self.sample:
            return
        if decision.privacy is not None:  # the privacy rules forbade using this user's history
            return
        imps = {imp.id: imp for imp in request.imps}
        lines = []
        for bid in decision.bids:
            imp = imps.get(bid.imp_id)
            if imp is None:
                continue
            features, state = snapshot.features(request, imp, now)
            line = {
                "ts": round(now, 3), "request_id": request.id, "imp_id": bid.imp_id, "bid_id": bid.bid_id,
                "campaign": bid.campaign_id, "price": bid.price, "cur": decision.cur, "cqs": round(bid.cqs, 6),
                "known": state is not None, "model": snapshot.versions.get("model", ""),
                "store": snapshot.versions.get("store", ""), "spec": SPEC, "features": features,
            }  # fmt: skip
            if self.events is not None:
                self.events.emit({"event": "decision", **line})
            lines.append(orjson.dumps(line) + b"\n")
        if not lines or self._fd < 0:
            return
        try:
            os.write(self._fd, b"".join(lines))
        except OSError:
            self.errors += 1
        else:
            self.written += len(lines)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
