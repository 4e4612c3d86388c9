"""A stand-in CQS scorer that isolates the core's unit tests from the real model."""

from __future__ import annotations

from pathlib import Path

from tafe.core import campaigns
from tafe.cqs import Score

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "data" / "requests"


class FixedScorer:
    """Every imp gets ``value``; the user is known iff the request still carries a user key."""

    def __init__(self, value: float = 0.5) -> None:
        self.value = value
        self.versions = {"model": "stub-1", "store": ""}
        self.shading = None  # as a Snapshot without a shading table: the fixed first_price_shade
        self.calls = 0

    def score(self, request, imp, now) -> Score:
        self.calls += 1
        return Score(self.value, bool(request.user_keys))


def test_campaigns(**overrides) -> campaigns.Campaigns:
    return campaigns.load(HERE / "campaigns.json", **overrides)


test_campaigns.__test__ = False  # a helper, not a test
