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
    "path,value,error",
    [
        (("campaigns",), "x", "campaigns: expected a list"),
        (("campaigns", 0, "id"), "bad id!", "campaigns[0].id: expected 1-64 of A-Z a-z 0-9 . _ ~ -"),
        (("campaigns", 1, "id"), "c-banner", "campaigns[1].id: duplicate of campaigns[0].id (c-banner)"),
        (("campaigns", 0, "max_cpm"), 1.0, "campaigns[0].max_cpm: expected at least base_cpm (2.0)"),
        (("campaigns", 0, "base_cpm"), -1, "campaigns[0].base_cpm: expected a positive number (at least 0.000001)"),
        (("campaigns", 0, "base_cpm"), KeyError, "campaigns[0].base_cpm: expected a positive number (at least 0.000001)"),
        (("campaigns", 0, "base_cpm"), 1e-7, "campaigns[0].base_cpm: expected a positive number (at least 0.000001)"),
        (("campaigns", 0, "base_cpm"), float("inf"), "campaigns[0].base_cpm: expected a positive number (at least 0.000001)"),
        (("campaigns", 0, "creatives"), [], "campaigns[0].creatives: expected a non-empty list"),
        (("campaigns", 0, "creatives", 0, "format"), "popup", "campaigns[0].creatives[0].format: expected one of audio, banner, native, video"),
        (("campaigns", 0, "creatives", 0, "format"), ["banner"], "campaigns[0].creatives[0].format: expected one of audio, banner, native, video"),
        (("campaigns", 0, "creatives", 0, "w"), "300", "campaigns[0].creatives[0].w: expected a positive integer"),
        (("campaigns", 0, "creatives", 0, "h"), 0, "campaigns[0].creatives[0].h: expected a positive integer"),
        (("campaigns", 0, "creatives", 0, "adm"), "", "campaigns[0].creatives[0].adm: expected the markup (macros allowed), a non-empty string"),
        (("campaigns", 0, "creatives", 0, "secure"), "yes", "campaigns[0].creatives[0].secure: expected true or false"),
        (("campaigns", 0, "creatives", 0, "size"), 3, "campaigns[0].creatives[0].size: unknown field (expected one of adm, attr, duration, format, h, id, language, mimes, secure, w)"),
        (("campaigns", 1, "creatives", 0, "duration"), KeyError, "campaigns[1].creatives[0].duration: expected a positive integer (seconds)"),
        (("campaigns", 1, "creatives", 0, "mimes"), [], "campaigns[1].creatives[0].mimes: expected a non-empty list of the markup's media types"),
        (("campaigns", 0, "adomain"), "shop.example", "campaigns[0].adomain: expected a list of strings"),
        (("campaigns", 0, "targeting"), {"channel": ["site", "tv"]}, "campaigns[0].targeting.channel[1]: expected site, app or dooh"),
        (("campaigns", 0, "targeting"), {"devicetype": ["phone"]}, "campaigns[0].targeting.devicetype: expected a list of integers"),
        (("campaigns", 0, "targeting"), {"known_users_only": 1}, "campaigns[0].targeting.known_users_only: expected true or false"),
        (("campaigns", 0, "targeting"), {"countries": ["FRA"]}, "campaigns[0].targeting.countries: unknown field (expected one of channel, country, devicetype, known_users_only, os)"),
        (("campaigns", 0, "targeting"), [], "campaigns[0].targeting: expected an object"),
        (("campaigns", 0), "c-banner", "campaigns[0]: expected an object"),
        (("fx",), {"EUR": "x"}, "fx.EUR: expected a positive number"),
        (("fx",), {"EUR": 0}, "fx.EUR: expected a positive number"),
        (("fx",), {"E R": 0}, 'fx["E R"]: expected a positive number'),
        (("score_pivot",), 0, "score_pivot: expected a number in (0, 1]"),
        (("first_price_shade",), 2, "first_price_shade: expected a number in (0, 1]"),
        (("currency",), "dollars", "currency: expected an ISO-4217 code"),
        (("version",), 2, "version: unknown field (expected one of campaigns, currency, first_price_shade, fx, score_pivot)"),
    ],
)
def test_bad_documents_are_refused_with_where_and_what(path, value, error):
    assert campaigns.validate(broken(path, value)) == (None, [error])
    with pytest.raises(CampaignsError) as exc:
        from_dict(broken(path, value))
    assert str(exc.value) == f"campaigns: {error}"


def test_bad_files(tmp_path):
    with pytest.raises(CampaignsError, match="campaigns file .*missing.json"):
        campaigns.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CampaignsError, match="bad.json"):
        campaigns.load(bad)
    bad.write_text("[]")
    with pytest.raises(CampaignsError, match=r"bad.json: \$: expected an object$"):
        campaigns.load(bad)


def test_immutable():
    c = from_dict(DOC)
    with pytest.raises(AttributeError):
        c.by_id["c-banner"].max_cpm_micros = 1  # type: ignore[misc]
