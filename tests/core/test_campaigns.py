"""Campaign files: validated with errors that name the entry, indexed for cheap matching."""

from __future__ import annotations

import copy
import json

import pytest

from tafe.core import campaigns
from tafe.core.campaigns import CampaignsError, from_dict, to_micros
from tafe.core.request import parse
from tafe.settings import Settings

from .stub import HERE

DOC = json.loads((HERE / "campaigns.json").read_text())


def test_bundled_demo_set_loads_with_default_settings():
    s = Settings()
    demo = campaigns.load(s.campaigns, seat=s.seat, currency=s.currency)
    sizes = {(c.w, c.h) for camp in demo.campaigns for c in camp.creatives if c.format.name == "BANNER"}
    assert {(300, 250), (728, 90), (320, 50), (300, 600), (160, 600), (320, 480), (970, 250), (336, 280)} <= sizes
    formats = {c.format.name for camp in demo.campaigns for c in camp.creatives}
    assert formats == {"BANNER", "VIDEO", "AUDIO", "NATIVE"}
    durations = {c.duration for camp in demo.campaigns for c in camp.creatives if c.format.name == "VIDEO"}
    assert len(durations) >= 3
    assert demo.currency == "USD" and demo.fx_micros["EUR"] > 0


def test_index_by_format_and_size():
    c = from_dict(DOC)
    imp = parse(b'{"id":"r","imp":[{"id":"1","banner":{"format":[{"w":300,"h":250},{"w":728,"h":90}]}}]}').imps[0]
    assert [cand.creative.id for cand in c.candidates(imp)] == ["c-banner-300x250", "c-banner-728x90"]
    imp = parse(b'{"id":"r","imp":[{"id":"1","banner":{"w":1,"h":1},"video":{"mimes":["video/mp4"]}}]}').imps[0]
    assert {cand.campaign.id for cand in c.candidates(imp)} == {"c-video"}
    imp = parse(b'{"id":"r","imp":[{"id":"1","banner":{}}]}').imps[0]
    assert len(c.candidates(imp)) == 5  # no size given: every banner creative
    assert c.candidates(parse(b'{"id":"r","imp":[{"id":"1"}]}').imps[0]) == []


def test_money_is_exact_micros():
    assert to_micros(0.1) == 100_000 and to_micros(1.0000005) == 1_000_001 and to_micros(3) == 3_000_000
    c = from_dict(DOC)
    assert c.by_id["c-banner"].base_cpm_micros == 2_000_000 and c.fx_micros == {"EUR": 1_100_000, "USD": 1_000_000}


def test_currency_must_match_settings():
    with pytest.raises(CampaignsError, match="prices are in USD but TAFE bids in EUR"):
        from_dict(DOC, currency="EUR")


def broken(path, value):
    doc = copy.deepcopy(DOC)
    target = doc
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("campaigns",), "x", "campaigns must be a list"),
        (("campaigns", 0, "id"), "bad id!", r"campaigns\[0\]: id must be"),
        (("campaigns", 1, "id"), "c-banner", "campaign ids must be unique"),
        (("campaigns", 0, "max_cpm"), 1.0, r"\(c-banner\): base_cpm must not exceed max_cpm"),
        (("campaigns", 0, "base_cpm"), -1, "base_cpm must be a positive number"),
        (("campaigns", 0, "base_cpm"), KeyError, "base_cpm must be a positive number"),
        (("campaigns", 0, "creatives"), [], "creatives must be a non-empty list"),
        (("campaigns", 0, "creatives", 0, "format"), "popup", "format must be one of"),
        (("campaigns", 0, "creatives", 0, "w"), "300", r"creatives\[0\]: banner w and h must be positive integers"),
        (("campaigns", 0, "creatives", 0, "adm"), "", "adm .* must be a non-empty string"),
        (("campaigns", 1, "creatives", 0, "duration"), KeyError, "duration must be a positive integer"),
        (("campaigns", 1, "creatives", 0, "mimes"), [], "mimes must list"),
        (("campaigns", 0, "adomain"), "shop.example", "adomain must be a list of strings"),
        (("campaigns", 0, "targeting"), {"channel": ["tv"]}, "targeting.channel entries"),
        (("campaigns", 0, "targeting"), {"devicetype": ["phone"]}, "targeting.devicetype must be a list of integers"),
        (("campaigns", 0, "targeting"), {"known_users_only": 1}, "known_users_only must be true or false"),
        (("fx",), {"EUR": "x"}, r"fx\[EUR\] must be a positive number"),
        (("fx",), {"EUR": 0}, r"fx\[EUR\] must be a positive number"),
        (("score_pivot",), 0, "score_pivot must be in"),
        (("first_price_shade",), 2, "first_price_shade must be in"),
        (("currency",), "dollars", "currency must be an ISO-4217 code"),
    ],
)
def test_bad_documents_are_refused_with_where_and_what(path, value, message):
    with pytest.raises(CampaignsError, match=message):
        from_dict(broken(path, value))


def test_bad_files(tmp_path):
    with pytest.raises(CampaignsError, match="campaigns file .*missing.json"):
        campaigns.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CampaignsError, match="bad.json"):
        campaigns.load(bad)
    bad.write_text("[]")
    with pytest.raises(CampaignsError, match="must be a JSON object"):
        campaigns.load(bad)


def test_immutable():
    c = from_dict(DOC)
    with pytest.raises(AttributeError):
        c.by_id["c-banner"].max_cpm_micros = 1  # type: ignore[misc]
