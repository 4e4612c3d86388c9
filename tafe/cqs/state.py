"""What TAFE knows of one user: the historical half of the CQS features.

``UserState`` is the contract between the store (which packs it into a fixed-size
binary record, memory-mapped and shared by all workers) and the feature extractor
(which reads it by name). Counts are over trailing windows ending at the store's
``as_of`` time; recencies are whole hours before ``as_of`` (``NEVER`` if no such
event). At request time, ``hours_since_*`` is aged by ``(now - as_of) / 3600``.

Event files that ``tafe cqs build-store`` reads are JSON lines, one event each::

    {"user": "<user key>", "ts": <unix seconds>, "type": "view"|"cart"|"purchase"|"shown"|"click"}
"""

from __future__ import annotations

from typing import NamedTuple

NEVER = 0xFFFF  # recency sentinel: no such event in the window kept
EVENT_TYPES = ("view", "cart", "purchase", "shown", "click")


class UserState(NamedTuple):
    views_1d: int = 0
    views_7d: int = 0
    views_30d: int = 0
    carts_7d: int = 0
    carts_30d: int = 0
    purchases_30d: int = 0
    purchases_365d: int = 0
    shown_1d: int = 0
    shown_7d: int = 0
    clicks_7d: int = 0
    clicks_30d: int = 0
    hours_since_view: int = NEVER
    hours_since_cart: int = NEVER
    hours_since_purchase: int = NEVER
    hours_since_click: int = NEVER
