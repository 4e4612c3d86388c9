"""Pacing: how much of a campaign's budget a worker may hold as float right now. Pure.

- ``asap``: everything not yet spent, reserved or floated.
- ``even``: a budget rate, recomputed at every call as what is left over what is left of
  the period (``left / (period_end - now)``), filling a bucket that holds at most
  ``BURST_S`` seconds of it. With traffic to spare, spend then follows the straight line
  from where the campaign stands to its budget at the period's end; a node started
  mid-period paces what is left over what is left; a slow hour is caught up over the rest
  of the period rather than at once.

The store keeps the bucket (level and time) per campaign and period, so every worker of a
node, or of a fleet, draws from one rate.
"""

from __future__ import annotations

__all__ = ["BURST_S", "grant"]

BURST_S = 2.0  # an even campaign may get at most two seconds of its rate ahead


def grant(
    *, pacing: str, want: int, left: int, now: float, period_end: int, bucket: int, bucket_ts: float
) -> tuple[int, int, int]:
    """``(granted nanos, new bucket level, rate in nanos/s)`` for one worker's ask."""
    left = max(left, 0)
    if pacing == "asap":
        return min(want, left), 0, 0
    remaining_s = max(period_end - now, 1.0)
    rate = left / remaining_s
    level = min(bucket + rate * max(now - bucket_ts, 0.0), rate * BURST_S)
    granted = max(min(want, int(level), left), 0)
    return granted, int(level) - granted, int(rate)
