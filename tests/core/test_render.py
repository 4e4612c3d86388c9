"""render(): the BidResponse shape, notice and tracking URLs, no-bid bodies."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

from tafe.core.decide import Inputs, decide, no_bid
from tafe.core.render import markup, render
from tafe.core.request import parse
from tafe.core.types import Creative, MediaType, NoBidReason

from .stub import FixedScorer, test_campaigns

NOW = 1_700_000_000.0


def bid_response(body: dict, **kw) -> dict:
    decision = decide(parse(json.dumps(body).encode()), Inputs(FixedScorer(), test_campaigns(), NOW))
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


def test_notice_urls_carry_one_token_and_the_exchange_macros():
    resp = bid_response({"id": "r", "imp": [{"id": "i/1", "banner": {"w": 300, "h": 250}}]}, tokens=["k1.abc.def"])
    bid = resp["seatbid"][0]["bid"][0]
    for key, path in (("nurl", "/notice/win"), ("burl", "/notice/bill"), ("lurl", "/notice/loss")):
        url = urlsplit(bid[key])
        assert (url.scheme, url.netloc, url.path) == ("https", "n.test", path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        assert q["t"] == "k1.abc.def"
        if key == "lurl":
            assert (q["l"], q["mtw"]) == ("${AUCTION_LOSS}", "${AUCTION_MIN_TO_WIN}")
        else:
            assert (q["p"], q["cur"]) == ("${AUCTION_PRICE}", "${AUCTION_CURRENCY}")


def _creative(fmt: MediaType, adm: str) -> Creative:
    return Creative(id="cr", format=fmt, w=1, h=1, adm=adm)


def test_markup_macros_become_tracking_urls():
    adm = '<a href="${TAFE_CLICK_URL}"><img src="x.png"></a><img src="${TAFE_IMP_URL}">${AUCTION_PRICE}'
    out = markup(_creative(MediaType.BANNER, adm), "IMP", "CLICK")
    assert out == '<a href="CLICK"><img src="x.png"></a><img src="IMP">${AUCTION_PRICE}'


def test_banner_without_pixel_gets_one_and_vast_an_impression():
    out = markup(_creative(MediaType.BANNER, "<a href='x'>ad</a>"), "IMP", "CLICK")
    assert out.startswith("<a href='x'>ad</a><img src=\"IMP\" width=\"1\" height=\"1\"")
    vast = '<VAST version="4.0"><Ad><InLine><AdSystem>a</AdSystem></InLine></Ad></VAST>'
    out = markup(_creative(MediaType.VIDEO, vast), "IMP", "CLICK")
    assert out == '<VAST version="4.0"><Ad><InLine><Impression><![CDATA[IMP]]></Impression><AdSystem>a</AdSystem></InLine></Ad></VAST>'
    native = '{"native": {"link": {"url": "${TAFE_CLICK_URL}"}}}'
    assert markup(_creative(MediaType.NATIVE, native), "IMP", "CLICK") == '{"native": {"link": {"url": "CLICK"}}}'
    assert markup(_creative(MediaType.NATIVE, '{"native": {}}'), "IMP", "CLICK") == '{"native": {}}'  # tracked from the win


def test_no_bid_bodies():
    d = no_bid("r1", NoBidReason.DEADLINE)
    assert render(d, seat="tafe", notice_base="") == b""
    assert json.loads(render(d, seat="tafe", notice_base="", nbr_in_response=True)) == {"id": "r1", "nbr": 15}
    d = no_bid("r2", NoBidReason.UNKNOWN_USER)
    assert json.loads(render(d, seat="tafe", notice_base="", nbr_in_response=True)) == {"id": "r2", "nbr": 8}
