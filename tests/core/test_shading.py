"""Learned first-price shading on the bid path: the table's lookup, its file, and decide's use of it."""

from __future__ import annotations

import json
import math
import re

import pytest

from tafe.core import shading
from tafe.core.campaigns import from_dict
from tafe.core.decide import Inputs, decide

from .stub import HERE, FixedScorer
from .test_decide import BANNER, NOW, camps, req

VALUE = 2_000_000  # c-banner: base 2.0 CPM at score 0.5, pivot 0.5


def table(curves: dict, lo: float = 0.3, version: str = "shade-test-1") -> shading.Shading:
    doc = {"format": shading.FORMAT, "version": version, "lo": lo, "contexts": curves}
    return shading.parse(json.dumps(doc).encode())


FLAT = lambda s: [math.log(0.1), 1.0, [s, s]]  # noqa: E731 - one shade at every value


def site(**fields):
    return {"site": {"domain": "news.example", "publisher": {"id": "pub-1"}}, **fields}


def price(decision) -> int:
    assert decision.bids, decision.no_bid
    return decision.bids[0].price_micros


def test_contexts_name_exchange_inventory_and_slot():
    r = req([BANNER, {"id": "2", "video": {"mimes": ["video/mp4"]}}], **site(at=1))
    assert [shading.context("ex", shading.inventory(r), imp) for imp in r.imps] == ["ex|pub-1|300x250", "ex|pub-1|video"]
    app = req([BANNER], app={"bundle": "com.a|b"})
    assert shading.inventory(app) == "com.a/b"  # the separator never appears inside a part


def test_a_context_backs_off_to_slot_then_exchange_then_nothing():
    t = table({"ex|pub-1|300x250": FLAT(0.5), "ex||728x90": FLAT(0.6), "ex||": FLAT(0.7)})
    assert t.curve("ex|pub-1|300x250")[2] == (0.5, 0.5)
    assert t.curve("ex|pub-2|728x90")[2] == (0.6, 0.6)
    assert t.curve("ex|pub-2|320x50")[2] == (0.7, 0.7)
    assert t.curve("other|pub-1|300x250") is None


def test_a_curve_interpolates_in_log_value_and_is_flat_past_its_ends():
    curve = (math.log(1.0), math.log(2.0), (1.0, 0.5, 0.4))  # shades at 1, 2 and 4 CPM
    assert shading.shade_at(curve, 1_000_000) == pytest.approx(1.0)
    assert shading.shade_at(curve, 2_000_000) == pytest.approx(0.5)
    assert shading.shade_at(curve, round(2_000_000 * math.sqrt(2))) == pytest.approx(0.45)
    assert shading.shade_at(curve, 100_000) == 1.0 and shading.shade_at(curve, 50_000_000) == 0.4
    assert shading.shade_at(curve, 0) == 1.0


def test_first_price_uses_the_learned_curve_and_records_the_context():
    t = table({"ex|pub-1|300x250": FLAT(0.5)})
    d = decide(req([BANNER], **site(at=1)), Inputs(FixedScorer(), camps(), NOW, shading=t, exchange="ex"))
    assert price(d) == VALUE // 2
    assert (d.bids[0].context, d.bids[0].value_micros) == ("ex|pub-1|300x250", VALUE)


def test_without_a_table_or_a_context_first_price_uses_the_fixed_factor():
    t = table({"other||": FLAT(0.5)})
    for shading_table in (None, t):
        d = decide(req([BANNER], **site(at=1)), Inputs(FixedScorer(), camps(), NOW, shading=shading_table, exchange="ex"))
        assert price(d) == VALUE * 8 // 10  # first_price_shade 0.8
        assert d.bids[0].context == "ex|pub-1|300x250"  # still learned from next round


def test_second_price_ignores_the_table():
    t = table({"ex||": FLAT(0.5)})
    d = decide(req([BANNER], **site(at=2)), Inputs(FixedScorer(), camps(), NOW, shading=t, exchange="ex"))
    assert price(d) == VALUE and d.bids[0].context == ""


def test_the_floor_rule_still_applies_to_a_learned_price():
    t = table({"ex||": FLAT(0.3)})
    imp = {**BANNER, "bidfloor": 1.0}
    d = decide(req([imp], **site(at=1)), Inputs(FixedScorer(), camps(), NOW, shading=t, exchange="ex"))
    assert price(d) == 1_000_000  # shaded to 0.6 CPM, raised to the floor the value clears
    imp = {**BANNER, "bidfloor": 2.5}
    d = decide(req([imp], **site(at=1)), Inputs(FixedScorer(), camps(), NOW, shading=t, exchange="ex"))
    assert not d.bids  # the value itself is under the floor: never bid above the value


def test_deal_bids_keep_the_fixed_factor():
    t = table({"ex||": FLAT(0.4)})
    doc = json.loads((HERE / "campaigns.json").read_text())
    doc["campaigns"][0]["deals"] = ["d1"]
    imp = {**BANNER, "pmp": {"private_auction": 1, "deals": [{"id": "d1", "bidfloor": 0.1}]}}
    d = decide(req([imp], **site(at=1)), Inputs(FixedScorer(), from_dict(doc), NOW, shading=t, exchange="ex"))
    assert d.bids[0].deal_id == "d1" and price(d) == VALUE * 8 // 10 and d.bids[0].context == ""


@pytest.mark.parametrize(
    "doc,why",
    [
        ({"format": "other"}, "not a shading table"),
        ({"version": "", "lo": 0.3, "contexts": {}}, "version"),
        ({"version": "v", "lo": 0.01, "contexts": {}}, "lo: expected"),
        ({"version": "v", "lo": 0.3, "contexts": {"no-bars": FLAT(0.5)}}, "expected 'exchange|inventory|slot'"),
        ({"version": "v", "lo": 0.3, "contexts": {"ex||": FLAT(0.2)}}, "within [lo, 1]"),  # below the safe bound
        ({"version": "v", "lo": 0.3, "contexts": {"ex||": FLAT(1.2)}}, "within [lo, 1]"),  # above the value
        ({"version": "v", "lo": 0.3, "contexts": {"ex||": [0, 0, [0.5, 0.5]]}}, "step > 0"),
        ({"version": "v", "lo": 0.3, "contexts": {"ex||": [0, 1, [0.5]]}}, "2+ shades"),
    ],
)
def test_a_bad_table_is_refused_with_the_reason(tmp_path, doc, why):
    path = tmp_path / "bad.cqsb"
    path.write_text(json.dumps({"format": shading.FORMAT, **doc}))
    with pytest.raises(shading.ShadingError, match=r"shading table .*bad\.cqsb: .*" + re.escape(why)):
        shading.load(str(path))
    path.write_bytes(b"\x00not json")
    with pytest.raises(shading.ShadingError, match="not JSON"):
        shading.load(str(path))
