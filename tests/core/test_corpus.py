"""Data-driven: every request in tests/data/requests/{valid,invalid} meets its ``.expect``.

valid: ``{"bids": [imp ids]}`` or ``{"bids": {imp id: {"campaign", "creative", "price", "deal", "rendered"}}}``
(``rendered``: fields of the bid as sent, null for "absent")
or ``{"nbr": "<NoBidReason label>"}``; optional ``"score"`` for the stand-in scorer and
``"gvl_vendor_id"`` for TAFE's vendor id (default 0); optional ``"privacy"``: the reason the
privacy rules gave (``Decision.privacy``, null for none).
invalid: ``{"status": 400, "reason": "<BadRequest reason>"}``.
"""

from __future__ import annotations

import json

import pytest

from tafe.core.decide import Inputs, decide
from tafe.core.render import render
from tafe.core.request import BadRequest, parse

from .stub import CORPUS, FixedScorer, test_campaigns

VALID = sorted((CORPUS / "valid").glob("*.json"))
INVALID = sorted((CORPUS / "invalid").glob("*.json"))
CAMPAIGNS = test_campaigns()
NOW = 1_700_000_000.0


def expect(path):
    return json.loads(path.with_suffix(".expect").read_text())


def test_corpus_is_there():
    assert len(VALID) >= 40 and len(INVALID) >= 30
    for path in VALID + INVALID:
        assert path.with_suffix(".expect").exists(), path


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid(path):
    want = expect(path)
    request = parse(path.read_bytes())
    decision = decide(request, Inputs(FixedScorer(want.get("score", 0.5)), CAMPAIGNS, NOW, gvl_vendor_id=want.get("gvl_vendor_id", 0)))
    body = render(decision, seat="tafe", notice_base="http://tafe.test")
    if "privacy" in want:
        assert decision.privacy == want["privacy"]
    if "nbr" in want:
        assert decision.bids == ()
        assert decision.no_bid is not None and decision.no_bid.label == want["nbr"]
        assert body == b""
        return
    assert decision.no_bid is None
    got = {bid.imp_id: bid for bid in decision.bids}
    assert sorted(got) == sorted(want["bids"])
    if isinstance(want["bids"], dict):
        for imp_id, fields in want["bids"].items():
            bid = got[imp_id]
            assert bid.campaign_id == fields.get("campaign", bid.campaign_id)
            assert bid.creative.id == fields.get("creative", bid.creative.id)
            assert bid.deal_id == fields.get("deal", bid.deal_id)
            if "price" in fields:
                assert bid.price == pytest.approx(fields["price"], abs=1e-9)
    response = json.loads(body)
    assert response["id"] == request.id
    assert [b["impid"] for b in response["seatbid"][0]["bid"]] == [b.imp_id for b in decision.bids]
    sent = {b["impid"]: b for b in response["seatbid"][0]["bid"]}
    for imp_id, fields in (want["bids"].items() if isinstance(want["bids"], dict) else ()):
        for key, value in fields.get("rendered", {}).items():
            assert sent[imp_id].get(key) == value, (imp_id, key)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid(path):
    want = expect(path)
    assert want["status"] == 400
    with pytest.raises(BadRequest) as info:
        parse(path.read_bytes())
    assert info.value.reason == want["reason"]
