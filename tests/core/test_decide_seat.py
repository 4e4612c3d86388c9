"""decide() with the seat of the request's exchange (``Inputs.seat``) instead of the campaigns' seat."""

from __future__ import annotations

import json

from tafe.core.campaigns import from_dict
from tafe.core.decide import Inputs, decide
from tafe.core.request import parse
from tafe.core.types import NoBidReason

from .stub import HERE, FixedScorer

CAMPAIGNS = from_dict(json.loads((HERE / "campaigns.json").read_text()), seat="tafe")
NOW = 1_700_000_000.0
BANNER = {"id": "1", "banner": {"w": 300, "h": 250}}
# A private auction whose one deal is open to seat "ox-9" only.
PRIVATE = {
    "id": "1", "banner": {"w": 300, "h": 600},
    "pmp": {"private_auction": 1, "deals": [{"id": "DEAL-W", "bidfloor": 1, "wseat": ["ox-9"]}]},
}  # fmt: skip


def req(imps, **fields):
    return parse(json.dumps({"id": "r", "imp": imps, **fields}).encode())


def test_wseat_and_bseat_are_matched_against_the_seat_passed_in():
    inputs = Inputs(FixedScorer(), CAMPAIGNS, NOW, seat="4711")
    assert decide(req([BANNER], wseat=["4711"]), inputs).bids
    assert decide(req([BANNER], wseat=["tafe"]), inputs).no_bid is NoBidReason.BLOCKED
    assert decide(req([BANNER], bseat=["4711"]), inputs).no_bid is NoBidReason.BLOCKED
    assert decide(req([BANNER], bseat=["tafe"]), inputs).bids


def test_a_deals_wseat_is_matched_against_the_seat_passed_in():
    (bid,) = decide(req([PRIVATE]), Inputs(FixedScorer(), CAMPAIGNS, NOW, seat="ox-9")).bids
    assert bid.deal_id == "DEAL-W"
    assert not decide(req([PRIVATE]), Inputs(FixedScorer(), CAMPAIGNS, NOW, seat="4711")).bids
    assert not decide(req([PRIVATE]), Inputs(FixedScorer(), CAMPAIGNS, NOW)).bids  # the campaigns' seat, "tafe"


def test_no_seat_passed_in_means_the_campaigns_seat():
    assert decide(req([BANNER], wseat=["tafe"]), Inputs(FixedScorer(), CAMPAIGNS, NOW)).bids
