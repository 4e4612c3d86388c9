"""decide(): pricing, floors, deals, blocks, currencies, scoring calls, determinism."""

from __future__ import annotations

import copy
import json

import pytest

from tafe.core.campaigns import from_dict
from tafe.core.decide import Inputs, _convert, _price, decide, no_bid
from tafe.core.request import parse
from tafe.core.types import NoBidReason

from .stub import HERE, FixedScorer

DOC = json.loads((HERE / "campaigns.json").read_text())
NOW = 1_700_000_000.0


def camps(**top):
    doc = copy.deepcopy(DOC)
    doc.update(top)
    return from_dict(doc)


def req(imps, **fields):
    body = {"id": "r", "imp": imps, "user": {"buyeruid": "u"}}
    body.update(fields)
    return parse(json.dumps(body).encode())


BANNER = {"id": "1", "banner": {"w": 300, "h": 250}}


@pytest.mark.parametrize(
    "value,floor,shade,want",
    [
        (2_000_000, 0, 1.0, 2_000_000),
        (2_000_000, 2_000_000, 1.0, 2_000_000),  # a price equal to the floor clears it
        (2_000_000, 2_000_001, 1.0, None),  # value below the floor: no raise
        (2_000_000, 1_800_000, 0.8, 1_800_000),  # shaded under the floor, raised since the value allows
        (2_000_000, 1_234_560, 0.5, 1_234_600),  # raised to the floor rounded UP to the 4-decimal grid
        (1_234_567, 0, 1.0, 1_234_500),  # prices go out with 4 decimals, rounded down
        (1_234_550, 1_234_501, 1.0, None),  # the floor on the grid (1.2346) is above the value
        (50, 0, 1.0, None),  # worth less than the smallest price: no bid
    ],
)
def test_price(value, floor, shade, want):
    assert _price(value, floor, shade) == want


def test_floor_conversion_rounds_up():
    fx = {"USD": 1_000_000, "EUR": 1_100_000}
    assert _convert(0.3, "USD", fx) == 300_000
    assert _convert(1.0, "eur", fx) == 1_100_000
    assert _convert(0.0000011, "EUR", fx) == 2  # 1.21 micros -> 2: never under the floor
    assert _convert(1.0, "XYZ", fx) is None


def test_money_compares_exactly_where_floats_would_not():
    assert 0.1 + 0.2 > 0.3  # the float trap
    doc = copy.deepcopy(DOC)
    doc["campaigns"][0]["base_cpm"] = 0.3
    d = decide(req([{**BANNER, "bidfloor": 0.3}]), Inputs(FixedScorer(0.5), from_dict(doc), NOW))
    assert [b.price for b in d.bids] == [0.3]
    d = decide(req([{**BANNER, "bidfloor": 0.1 + 0.2}]), Inputs(FixedScorer(0.5), from_dict(doc), NOW))
    assert [b.price for b in d.bids] == [0.3]  # 0.30000000000000004 is 300000 micros, not above 0.3


def test_value_scales_with_score_and_clips_to_max():
    c = camps()
    prices = [decide(req([BANNER]), Inputs(FixedScorer(s), c, NOW)).bids[0].price for s in (0.25, 0.5, 0.75, 1.0)]
    assert prices == [1.0, 2.0, 3.0, 4.0]  # base 2.0 at the 0.5 pivot; max 5.0 not reached
    assert decide(req([BANNER]), Inputs(FixedScorer(0.0), c, NOW)).no_bid is NoBidReason.BELOW_FLOOR
    high = camps(score_pivot=0.1)
    assert decide(req([BANNER]), Inputs(FixedScorer(0.9), high, NOW)).bids[0].price == 5.0


def test_score_out_of_range_is_clamped():
    c = camps()
    assert decide(req([BANNER]), Inputs(FixedScorer(7.0), c, NOW)).bids[0].price == 4.0
    assert decide(req([BANNER]), Inputs(FixedScorer(-1.0), c, NOW)).no_bid is NoBidReason.BELOW_FLOOR


def test_scored_once_per_imp_and_not_at_all_without_candidates():
    scorer = FixedScorer()
    decide(req([{"id": "1", "banner": {"format": [{"w": 300, "h": 250}, {"w": 728, "h": 90}]}}, {"id": "2", "banner": {"w": 1, "h": 1}}]), Inputs(scorer, camps(), NOW))
    assert scorer.calls == 1


FULL_2_6_8 = "COzTVhaOzTVhaGvAAAENAiCIAP_AAH_AAAAAAEEUACCKAAA"  # tests/core/test_privacy.py: vendors 2, 6, 8
USNAT_OPT_OUT = "DBABL~BVVVkkkkkpFY.YA"  # tests/core/test_privacy.py: usnat sale/sharing/targeted opt-out


@pytest.mark.parametrize(
    "fields, vendor, keys, privacy",
    [
        ({}, 0, ("u",), None),
        ({"regs": {"coppa": 1}}, 0, (), "coppa"),
        ({"device": {"lmt": 1}}, 0, (), "lmt"),
        ({"regs": {"us_privacy": "1YYN"}}, 0, (), "us_privacy_opt_out"),
        ({"regs": {"gpp": USNAT_OPT_OUT, "gpp_sid": [7]}}, 0, (), "gpp_opt_out"),
        ({"regs": {"gdpr": 1}, "user": {"buyeruid": "u", "consent": FULL_2_6_8}}, 2, ("u",), None),
        ({"regs": {"gdpr": 1}, "user": {"buyeruid": "u", "consent": FULL_2_6_8}}, 3, (), "gdpr_no_vendor"),
        ({"regs": {"gdpr": 1}, "user": {"buyeruid": "u", "consent": FULL_2_6_8}}, 0, (), "gdpr_no_vendor_id"),
    ],
)
def test_history_only_where_the_privacy_rules_allow_it(fields, vendor, keys, privacy):
    class Spy(FixedScorer):
        def score(self, request, imp, now):
            self.keys = request.user_keys
            return super().score(request, imp, now)

    spy = Spy()
    d = decide(req([BANNER], **fields), Inputs(spy, camps(), NOW, gvl_vendor_id=vendor))
    assert d.bids and spy.keys == keys and d.privacy == privacy


@pytest.mark.parametrize("consent, reason", [("", "gdpr_no_consent"), ("BON", "gdpr_bad_consent")])
def test_no_bid_where_gdpr_applies_without_a_usable_consent_string(consent, reason):
    scorer = FixedScorer()
    d = decide(req([BANNER], regs={"gdpr": 1}, user={"buyeruid": "u", "consent": consent}), Inputs(scorer, camps(), NOW, gvl_vendor_id=2))
    assert d.no_bid is NoBidReason.PRIVACY and d.privacy == reason and not d.bids and scorer.calls == 0


def test_deterministic_and_bid_ids_unique():
    c = camps()
    r = req([BANNER, {**BANNER, "id": "2"}])
    a, b = decide(r, Inputs(FixedScorer(), c, NOW)), decide(r, Inputs(FixedScorer(), c, NOW))
    assert a.bids == b.bids
    assert len({bid.bid_id for bid in a.bids}) == 2
    later = decide(r, Inputs(FixedScorer(), c, NOW + 1))
    assert {bid.bid_id for bid in later.bids}.isdisjoint(bid.bid_id for bid in a.bids)


def test_decision_carries_versions_and_currency():
    d = decide(req([BANNER]), Inputs(FixedScorer(), camps(), NOW))
    assert d.versions == {"model": "stub-1", "store": ""} and d.cur == "USD" and d.request_id == "r"
    assert d.bids[0].cqs == 0.5


def test_best_value_wins_across_campaigns_and_formats():
    d = decide(req([{"id": "1", "banner": {"w": 300, "h": 250}, "video": {"mimes": ["video/mp4"]}, "native": {"request": "{}"}}]), Inputs(FixedScorer(), camps(), NOW))
    assert d.bids[0].campaign_id == "c-video" and d.bids[0].price == 5.0


def test_no_bid_reason_is_the_furthest_stage_over_imps():
    c = camps()
    d = decide(req([{"id": "1", "banner": {"w": 1, "h": 1}}, {**BANNER, "id": "2", "bidfloor": 99}], bcat=[]), Inputs(FixedScorer(), c, NOW))
    assert d.no_bid is NoBidReason.BELOW_FLOOR
    d = decide(req([{"id": "1", "banner": {"w": 1, "h": 1}}, {**BANNER, "id": "2"}], bcat=["IAB22-2"]), Inputs(FixedScorer(), c, NOW))
    assert d.no_bid is NoBidReason.BLOCKED


def test_seat_from_campaigns():
    c = from_dict(DOC, seat="acme")
    assert decide(req([BANNER], wseat=["acme"]), Inputs(FixedScorer(), c, NOW)).bids
    assert decide(req([BANNER], bseat=["acme"]), Inputs(FixedScorer(), c, NOW)).no_bid is NoBidReason.BLOCKED


def test_no_bid_helper():
    d = no_bid("r", NoBidReason.DEADLINE, versions={"model": "m"})
    assert (d.bids, d.no_bid.nbr, d.versions) == ((), 15, {"model": "m"})
