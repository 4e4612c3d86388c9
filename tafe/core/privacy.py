"""May TAFE use this user's history? One place answers, for scoring and for the logs.

``may_use_history(request)`` is None when it may, else the reason it may not:
``coppa`` (regs.coppa = 1) or ``gdpr_no_consent`` (GDPR applies and no consent string).
"""

from __future__ import annotations

from tafe.core.types import BidRequest

__all__ = ["may_use_history"]


def may_use_history(request: BidRequest) -> str | None:
    """None if the user's history (store lookup, frequency counts, decision log) may be used."""
    if request.coppa:
        return "coppa"
    if request.gdpr and not request.consent:
        return "gdpr_no_consent"
    return None
