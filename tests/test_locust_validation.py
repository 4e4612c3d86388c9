"""The load test's judge (benchmarks/traffic.py): it must catch wrong answers, not just count them."""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import traffic  # noqa: E402


def request(**imp_fields) -> dict:
    imp = {"id": "1", "banner": {"w": 300, "h": 250, "format": [{"w": 300, "h": 250}]}, "bidfloor": 0.5, **imp_fields}
    return {"id": "req-1", "imp": [imp, {"id": "2", "video": {"mimes": ["video/mp4"]}}], "cur": ["USD"]}


def answer(*bids: dict, **top) -> bytes:
    return json.dumps({"id": "req-1", "cur": "USD", "seatbid": [{"seat": "tafe", "bid": list(bids)}], **top}).encode()


def bid(**fields) -> dict:
    return {"id": "b1", "impid": "1", "price": 0.75, "adm": "<div/>", "nurl": "http://x/win?p=${AUCTION_PRICE}", "w": 300, "h": 250, **fields}


def test_a_good_bid_passes_and_is_returned():
    outcome = traffic.validate(request(), 200, answer(bid()))
    assert outcome.ok, outcome.reason
    assert [b["impid"] for b in outcome.bids] == ["1"]


def test_a_bid_under_the_floor_is_flagged():
    outcome = traffic.validate(request(), 200, answer(bid(price=0.49)))
    assert not outcome.ok
    assert "under floor" in outcome.reason


def test_a_bid_for_an_unknown_impid_is_flagged():
    outcome = traffic.validate(request(), 200, answer(bid(impid="7")))
    assert not outcome.ok
    assert "unknown impid" in outcome.reason


@pytest.mark.parametrize(
    "bids, reason",
    [
        ([bid(), bid(id="b2")], "two bids"),
        ([bid(price=0)], "bad price"),
        ([bid(price="1.0")], "bad price"),
        ([bid(adm="", nurl="")], "neither adm nor nurl"),
        ([bid(w=728, h=90)], "not offered"),
        ([bid(id="")], "without an id"),
        ([bid(dealid="nope")], "not offered on imp"),
    ],
)
def test_other_malformed_bids_are_flagged(bids, reason):
    outcome = traffic.validate(request(), 200, answer(*bids))
    assert reason in outcome.reason


def test_deal_bids_must_clear_the_deal_floor_and_private_imps_need_a_deal():
    pmp = {"private_auction": 1, "deals": [{"id": "d1", "bidfloor": 2.0}]}
    assert traffic.validate(request(pmp=pmp), 200, answer(bid(dealid="d1", price=2.5))).ok
    assert "under floor 2.0" in traffic.validate(request(pmp=pmp), 200, answer(bid(dealid="d1", price=1.0))).reason
    assert "private imp" in traffic.validate(request(pmp=pmp), 200, answer(bid(price=5.0))).reason


@pytest.mark.parametrize(
    "status, body, ok",
    [
        (204, b"", True),
        (204, b"x", False),
        (400, b"", False),
        (500, b"", False),
        (200, b"not json", False),
        (200, b"[]", False),
        (200, json.dumps({"id": "other", "seatbid": [{"bid": [bid()]}]}).encode(), False),
        (200, json.dumps({"id": "req-1", "seatbid": [], "nbr": 2}).encode(), True),
        (200, json.dumps({"id": "req-1"}).encode(), False),
        (200, json.dumps({"id": "req-1", "cur": "EUR", "seatbid": [{"bid": [bid()]}]}).encode(), False),
        (200, json.dumps({"id": "req-1", "seatbid": [{"bid": []}]}).encode(), False),
    ],
)
def test_status_and_envelope(status, body, ok):
    outcome = traffic.validate(request(), status, body)
    assert outcome.ok is ok, outcome.reason
    if not ok:
        assert outcome.reason  # a failure always says why


def test_gzipped_answers_are_judged_after_inflating():
    assert traffic.validate(request(), 200, gzip.compress(answer(bid()))).ok
    assert not traffic.validate(request(), 200, gzip.compress(answer(bid(price=0.1)))).ok


def test_win_url_fills_the_macros():
    url = traffic.win_url(bid(nurl="http://h/n?p=${AUCTION_PRICE}&a=${AUCTION_ID}&i=${AUCTION_IMP_ID}"), request())
    assert url == "http://h/n?p=0.6000&a=req-1&i=1"


def test_generated_traffic_is_deterministic_varied_and_well_formed():
    gen = traffic.Generator(traffic.Mix(users=1000), seed=3)
    reqs = [gen.request() for _ in range(2000)]
    again = traffic.Generator(traffic.Mix(users=1000), seed=3)
    assert [again.request() for _ in range(5)] == reqs[:5]
    assert len({r["id"] for r in reqs}) == len(reqs)
    formats = Counter(k for r in reqs for imp in r["imp"] for k in traffic.FORMATS if k in imp)
    assert set(formats) == set(traffic.FORMATS)
    assert 0.2 < sum("app" in r for r in reqs) / len(reqs) < 0.5
    assert all(("app" in r) != ("site" in r) for r in reqs)
    assert any(len(r["imp"]) > 1 for r in reqs) and any("pmp" in imp for r in reqs for imp in r["imp"])
    for r in reqs:
        assert len({imp["id"] for imp in r["imp"]}) == len(r["imp"])
    # long-tailed users: the most frequent user is seen far more often than the median one
    users = Counter(r["user"]["buyeruid"] for r in reqs if "buyeruid" in r.get("user", {}))
    top = users.most_common(1)[0]
    assert top[0] == "u0000001" and top[1] > 20 * max(1, sorted(users.values())[len(users) // 2])


def test_a_share_of_bodies_is_gzipped_and_inflates_to_the_request():
    gen = traffic.Generator(traffic.Mix(gzip=0.5), seed=1)
    encoded = [(r, *gen.encode(r)) for r in (gen.request() for _ in range(200))]
    zipped = [(r, body) for r, body, headers in encoded if headers.get("Content-Encoding") == "gzip"]
    assert 50 < len(zipped) < 150
    assert all(json.loads(gzip.decompress(body)) == r for r, body in zipped)


def test_mix_reads_the_environment():
    mix = traffic.Mix.from_env({"TRAFFIC_GZIP": "0.3", "TRAFFIC_MAX_IMPS": "3", "TRAFFIC_USER_PREFIX": "x"})
    assert (mix.gzip, mix.max_imps, mix.user_prefix) == (0.3, 3, "x")


def test_the_benchmark_body_is_about_1500_bytes_and_valid_json():
    body = traffic.sample_body()
    assert 1400 <= len(body) <= 1600
    assert json.loads(body)["imp"][0]["banner"]["w"] == 300


def test_known_users_can_come_from_a_file_of_store_keys(tmp_path):
    keys = tmp_path / "users.txt"
    keys.write_text("u-aaa\nu-bbb\n\nu-ccc\n")
    gen = traffic.Generator(traffic.Mix(users_file=str(keys), known_user=1.0), seed=2)
    seen = Counter(gen.request()["user"]["buyeruid"] for _ in range(600))
    assert set(seen) == {"u-aaa", "u-bbb", "u-ccc"}
    assert seen["u-aaa"] > seen["u-ccc"]


def test_users_file_may_be_cqs_events_jsonl(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text('{"user":"u-1","ts":1,"type":"view"}\n{"user":"u-1","ts":2,"type":"cart"}\n{"user":"u-2","ts":3,"type":"view"}\n')
    gen = traffic.Generator(traffic.Mix(users_file=str(events), known_user=1.0), seed=2)
    assert {gen.request()["user"]["buyeruid"] for _ in range(200)} == {"u-1", "u-2"}
