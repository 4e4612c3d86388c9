"""Learned bid shading for first-price auctions: the table the bid path reads.

In a first-price auction (``at=1``) the winner pays its own bid, so bidding the full
value overpays. Without a table every first-price bid is the value times the campaigns'
fixed ``first_price_shade``. ``tafe cqs pipeline`` learns, per *context*, the
distribution of the highest competing bid from win and loss notices and publishes a
``Shading`` (a ``*.cqsb`` file in the watch directory, hot-swapped with the CQS model and
store): for each context, the shade (price / value) as a function of the value.

A context is ``exchange|inventory|slot``: the exchange profile's name, the publisher id
(else the site domain, else the app bundle) and the imp's first banner size
(``300x250``) or ``video`` / ``audio`` / ``native``. A context the table lacks backs off
to ``exchange||slot``, then ``exchange||``, then the fixed factor: the pipeline only
writes contexts it saw often enough.

A curve is ``(log_v0, step, shades)``: shades at values ``exp(log_v0 + i * step)`` CPM,
linearly interpolated in log-value and held flat past either end. Every shade lies
within ``[lo, 1]`` (``lo`` is in the file, checked on load): a price is never above the
value nor below ``lo`` times it, whatever the data said. ``decide`` then applies the
floor rule as it does for the fixed factor.

Cost: the bid path pays only for first-price imps, three dict look-ups at most per imp and
one ``math.log`` per candidate. No numpy, nothing of training (``tafe.cqs.offline.shading``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import orjson

from tafe.core.types import BidRequest, Imp

__all__ = ["FORMAT", "Curve", "Shading", "ShadingError", "context", "inventory", "load", "parse", "shade_at"]

FORMAT = "tafe-shading-1"
SUFFIX = ".cqsb"
MIN_LO = 0.05  # no file may shade below this fraction of the value
_MAX_KEY = 200

Curve = tuple[float, float, tuple[float, ...]]  # (log of the first value in CPM, step in log-value, shades)


class ShadingError(ValueError):
    """A shading file that cannot be used; the message says why."""


def inventory(request: BidRequest) -> str:
    """The inventory part of a context: publisher id, else site domain, else app bundle."""
    return (request.publisher_id or request.domain or request.bundle).replace("|", "/")[:100]


def slot(imp: Imp) -> str:
    """The slot part of a context: the first banner size, else the media type."""
    if imp.banner_sizes:
        w, h = imp.banner_sizes[0]
        return f"{w}x{h}"
    if imp.video is not None:
        return "video"
    if imp.audio is not None:
        return "audio"
    return "native" if imp.native else ""


def context(exchange: str, inventory: str, imp: Imp) -> str:
    """``exchange|inventory|slot``: what a first-price bid's notices are learned under."""
    return f"{exchange}|{inventory}|{slot(imp)}"


def parents(key: str) -> tuple[str, str]:
    """The two coarser contexts of ``key``: ``exchange||slot`` and ``exchange||``."""
    exchange, _, rest = key.partition("|")
    return f"{exchange}||{rest.rpartition('|')[2]}", f"{exchange}||"


@dataclass(frozen=True, slots=True)
class Shading:
    """Curves by context; immutable once loaded (hot swap replaces the whole object)."""

    version: str
    lo: float
    curves: dict[str, Curve]
    meta: dict[str, object]

    def curve(self, key: str) -> Curve | None:
        """The curve of ``key``, else of its coarser contexts; None: use the fixed factor."""
        curves = self.curves
        found = curves.get(key)
        if found is None:
            by_slot, by_exchange = parents(key)
            found = curves.get(by_slot) or curves.get(by_exchange)
        return found


def shade_at(curve: Curve, value_micros: int) -> float:
    """The shade of a value (CPM micros) on a curve: interpolated in log-value, flat past the ends."""
    log_v0, step, shades = curve
    if value_micros <= 0:
        return shades[0]
    x = (math.log(value_micros / 1_000_000) - log_v0) / step
    last = len(shades) - 1
    if x <= 0:
        return shades[0]
    if x >= last:
        return shades[last]
    i = int(x)
    return shades[i] + (shades[i + 1] - shades[i]) * (x - i)


def parse(data: bytes) -> Shading:
    """A ``Shading`` from a file's bytes; raises ``ShadingError`` saying what is wrong."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ShadingError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ShadingError(f"not a shading table (expected format {FORMAT!r})")
    version, lo, raw, meta = doc.get("version"), doc.get("lo"), doc.get("contexts"), doc.get("meta", {})
    if not isinstance(version, str) or not version or len(version) > 100:
        raise ShadingError("version: expected a non-empty string")
    if not isinstance(lo, (int, float)) or isinstance(lo, bool) or not MIN_LO <= lo <= 1:
        raise ShadingError(f"lo: expected a number within [{MIN_LO}, 1]")
    if not isinstance(raw, dict) or not isinstance(meta, dict):
        raise ShadingError("contexts and meta: expected objects")
    curves: dict[str, Curve] = {}
    for key, entry in raw.items():
        if len(key) > _MAX_KEY or key.count("|") != 2:
            raise ShadingError(f"context {key[:60]!r}: expected 'exchange|inventory|slot'")
        ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[2], list) and 2 <= len(entry[2]) <= 1024
        if ok:
            log_v0, step, shades = entry
            nums = (log_v0, step, *shades)
            ok = all(type(n) in (int, float) and math.isfinite(n) for n in nums) and step > 0
            ok = ok and all(lo <= s <= 1 for s in shades)
        if not ok:
            raise ShadingError(f"context {key[:60]!r}: expected [log_v0, step > 0, [2+ shades within [lo, 1]]]")
        curves[key] = (float(entry[0]), float(entry[1]), tuple(float(s) for s in entry[2]))
    return Shading(version, float(lo), curves, meta)


def load(path: str) -> Shading:
    """Read and validate a ``*.cqsb`` file; raises ``ShadingError`` naming the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 20)
        return parse(data)
    except OSError as exc:
        raise ShadingError(f"shading table {path}: cannot read ({exc.strerror or exc})") from None
    except ShadingError as exc:
        raise ShadingError(f"shading table {path}: {exc}") from None
