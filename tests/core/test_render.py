"""render(): the BidResponse shape, notice URLs that carry the join state, no-bid bodies."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from tafe.core.decide import decide, no_bid
from tafe.core.render import render
from tafe.core.request import parse
from tafe.core.types import NoBidReason

from .stub import FixedScorer, test_campaigns

NOW = 1_700_000_000.0


def bid_response(body: dict, **kw) -> dict:
    decision = decide(parse(json.dumps(body).encode()), FixedScorer(), test_campaigns(), NOW)
    return json.loads(render(decision, seat="tafe", notice_base="https://n.test", **kw))


def test_banner_video_native_deal_fields():
    resp = bid_response(
        {
            "id": "req/1 é",
            "imp": [
                {"id": "b", "banner": {"w": 300, "h": 250}},
                {"id": "v", "video": {"mimes": ["video/mp4"], "maxduration": 15}},
                {"id": "n", "native": {"request": "{}"}},
                {"id": "d", "banner": {"w": 300, "h": 600}, "pmp": {"private_auction": 1, "deals": [{"id": "DEAL-1", "bidfloor": 1}]}},
            ],
        }
    )
    assert resp["id"] == "req/1 é" and resp["cur"] == "USD" and resp["ext"] == {"cqs": {"model": "stub-1", "store": ""}}
    (seat,) = resp["seatbid"]
    bids = {b["impid"]: b for b in seat["bid"]}
    assert seat["seat"] == "tafe" and resp["bidid"] == seat["bid"][0]["id"]
    b, v, n, d = bids["b"], bids["v"], bids["n"], bids["d"]
    assert (b["mtype"], b["w"], b["h"], b["crid"], b["cid"], b["adomain"], b["cat"]) == (1, 300, 250, "c-banner-300x250", "c-banner", ["shop.example"], ["IAB22-2"])
    assert "${AUCTION_PRICE}" in b["adm"]  # macros left for the exchange
    assert (v["mtype"], v["dur"], "w" in v) == (2, 15, False)
    assert n["mtype"] == 4 and json.loads(n["adm"])["native"]
    assert d["dealid"] == "DEAL-1" and "dealid" not in b


def test_notice_urls_carry_the_join_state():
    resp = bid_response({"id": "req 1&x", "imp": [{"id": "i/1", "banner": {"w": 300, "h": 250}}]})
    bid = resp["seatbid"][0]["bid"][0]
    for key, path in (("nurl", "/notice/win"), ("burl", "/notice/bill"), ("lurl", "/notice/loss")):
        url = urlsplit(bid[key])
        assert (url.scheme, url.netloc, url.path) == ("https", "n.test", path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        assert (q["r"], q["i"], q["b"], q["c"], q["cr"], q["m"]) == ("req 1&x", "i/1", bid["id"], "c-banner", "c-banner-300x250", "stub-1")
        assert float(q["bp"]) == bid["price"] and q["p"] == "${AUCTION_PRICE}" and q["cur"] == "${AUCTION_CURRENCY}"
    assert parse_qs(urlsplit(bid["lurl"]).query)["l"] == ["${AUCTION_LOSS}"]


def test_no_bid_bodies():
    d = no_bid("r1", NoBidReason.DEADLINE)
    assert render(d, seat="tafe", notice_base="") == b""
    assert json.loads(render(d, seat="tafe", notice_base="", nbr_in_response=True)) == {"id": "r1", "nbr": 15}
    d = no_bid("r2", NoBidReason.UNKNOWN_USER)
    assert json.loads(render(d, seat="tafe", notice_base="", nbr_in_response=True)) == {"id": "r2", "nbr": 8}
