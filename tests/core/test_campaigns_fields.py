"""The money fields of a campaign (budget, pacing, frequency cap, landing URL): read exactly,
and every mistake reported with its JSON path, all of them in one pass."""

from __future__ import annotations

import copy
import json

import pytest

from tafe.core import campaigns
from tafe.core.campaigns import CampaignsError, FrequencyCap, from_dict, validate
from tafe.core.types import Dsa
from tafe.settings import Settings

from .stub import HERE

DOC = json.loads((HERE / "campaigns.json").read_text())


def with_fields(index: int = 0, **fields) -> dict:
    doc = copy.deepcopy(DOC)
    doc["campaigns"][index].update(fields)
    return doc


def test_absent_fields_mean_no_budget_even_pacing_no_cap_no_landing_url():
    c = from_dict(DOC).campaigns[0]
    assert (c.budget_micros, c.pacing, c.frequency_cap, c.landing_url) == (0, "even", None, "")


def test_good_values_are_read_exactly():
    doc = with_fields(
        daily_budget=0.1 + 0.2,  # 0.30000000000000004: exact micros, not a float
        pacing="asap",
        frequency_cap={"impressions": 3, "window_s": 86400},
        landing_url="https://shop.example/sale?src=tafe",
    )
    c = from_dict(doc).campaigns[0]
    assert c.budget_micros == 300_000 and type(c.budget_micros) is int
    assert c.pacing == "asap"
    assert c.frequency_cap == FrequencyCap(impressions=3, window_s=86400)
    assert c.landing_url == "https://shop.example/sale?src=tafe"
    assert from_dict(with_fields(daily_budget=500)).campaigns[0].budget_micros == 500_000_000
    assert from_dict(with_fields(pacing="even")).campaigns[0].pacing == "even"
    assert from_dict(with_fields(landing_url="http://shop.example")).campaigns[0].landing_url == "http://shop.example"
    with pytest.raises(AttributeError):
        c.frequency_cap.impressions = 4  # type: ignore[misc,union-attr]


BUDGET = "expected a positive number (at least 0.000001)"
CAP_N = "expected a positive integer"
CAP_S = "expected a positive integer (seconds)"
URL = "expected an absolute http or https URL"
CATTAX = "expected a positive integer (AdCOM category taxonomy)"
LANGUAGE = "expected an ISO-639-1 code (two lower-case letters)"
DSA_TEXT = "expected 1-100 characters, no surrounding spaces"
ADRENDER = "expected 0 (the publisher renders the notice) or 1 (the creative does)"


@pytest.mark.parametrize(
    "fields,errors",
    [
        ({"daily_budget": 0}, [f"campaigns[1].daily_budget: {BUDGET}"]),
        ({"daily_budget": -50}, [f"campaigns[1].daily_budget: {BUDGET}"]),
        ({"daily_budget": 1e-7}, [f"campaigns[1].daily_budget: {BUDGET}"]),  # 0 micros would mean "unlimited"
        ({"daily_budget": "100"}, [f"campaigns[1].daily_budget: {BUDGET}"]),
        ({"daily_budget": True}, [f"campaigns[1].daily_budget: {BUDGET}"]),
        ({"daily_budget": None}, [f"campaigns[1].daily_budget: {BUDGET}"]),
        ({"daily_budget": float("nan")}, [f"campaigns[1].daily_budget: {BUDGET}"]),
        ({"daily_budgte": 100}, ["campaigns[1].daily_budgte: unknown field (expected one of adomain, advertiser, base_cpm, "
                                 "bundle, cat, cattax, creatives, daily_budget, deals, dsa, frequency_cap, id, landing_url, "
                                 "language, max_cpm, pacing, targeting)"]),
        ({"cattax": 0}, [f"campaigns[1].cattax: {CATTAX}"]),
        ({"cattax": "1"}, [f"campaigns[1].cattax: {CATTAX}"]),
        ({"language": "EN"}, [f"campaigns[1].language: {LANGUAGE}"]),
        ({"language": "eng"}, [f"campaigns[1].language: {LANGUAGE}"]),
        ({"dsa": "Acme"}, ["campaigns[1].dsa: expected an object"]),
        ({"dsa": {}}, [f"campaigns[1].dsa.behalf: {DSA_TEXT}", f"campaigns[1].dsa.paid: {DSA_TEXT}"]),
        ({"dsa": {"behalf": "A", "paid": "x" * 101}}, [f"campaigns[1].dsa.paid: {DSA_TEXT}"]),
        ({"dsa": {"behalf": " A", "paid": "B"}}, [f"campaigns[1].dsa.behalf: {DSA_TEXT}"]),
        ({"dsa": {"behalf": "A", "paid": "B", "adrender": 2}}, [f"campaigns[1].dsa.adrender: {ADRENDER}"]),
        ({"dsa": {"behalf": "A", "paid": "B", "adrender": True}}, [f"campaigns[1].dsa.adrender: {ADRENDER}"]),
        (
            {"dsa": {"behalf": "A", "paid": "B", "transparency": []}},
            ["campaigns[1].dsa.transparency: unknown field (expected one of adrender, behalf, paid)"],
        ),
        ({"pacing": "fast"}, ['campaigns[1].pacing: expected "even" or "asap"']),
        ({"pacing": "EVEN"}, ['campaigns[1].pacing: expected "even" or "asap"']),
        ({"pacing": ["even"]}, ['campaigns[1].pacing: expected "even" or "asap"']),
        ({"frequency_cap": 3}, ["campaigns[1].frequency_cap: expected an object"]),
        ({"frequency_cap": {}}, [f"campaigns[1].frequency_cap.impressions: {CAP_N}", f"campaigns[1].frequency_cap.window_s: {CAP_S}"]),
        ({"frequency_cap": {"impressions": 0, "window_s": 60}}, [f"campaigns[1].frequency_cap.impressions: {CAP_N}"]),
        ({"frequency_cap": {"impressions": 2.5, "window_s": 60}}, [f"campaigns[1].frequency_cap.impressions: {CAP_N}"]),
        ({"frequency_cap": {"impressions": True, "window_s": 60}}, [f"campaigns[1].frequency_cap.impressions: {CAP_N}"]),
        ({"frequency_cap": {"impressions": 2, "window_s": -1}}, [f"campaigns[1].frequency_cap.window_s: {CAP_S}"]),
        ({"frequency_cap": {"impressions": 2, "window_s": "1h"}}, [f"campaigns[1].frequency_cap.window_s: {CAP_S}"]),
        (
            {"frequency_cap": {"impressions": 2, "window": 60}},
            ["campaigns[1].frequency_cap.window: unknown field (expected one of impressions, window_s)",
             f"campaigns[1].frequency_cap.window_s: {CAP_S}"],
        ),
        ({"landing_url": "shop.example/sale"}, [f"campaigns[1].landing_url: {URL}"]),
        ({"landing_url": "/sale"}, [f"campaigns[1].landing_url: {URL}"]),
        ({"landing_url": "ftp://shop.example/sale"}, [f"campaigns[1].landing_url: {URL}"]),
        ({"landing_url": "javascript:alert(1)"}, [f"campaigns[1].landing_url: {URL}"]),
        ({"landing_url": "https://"}, [f"campaigns[1].landing_url: {URL}"]),
        ({"landing_url": "https://shop.example/a b"}, [f"campaigns[1].landing_url: {URL}"]),
        ({"landing_url": "https://[::1"}, [f"campaigns[1].landing_url: {URL}"]),
        ({"landing_url": ""}, [f"campaigns[1].landing_url: {URL}"]),
        ({"landing_url": 42}, [f"campaigns[1].landing_url: {URL}"]),
    ],
)
def test_bad_values_name_their_exact_path(fields, errors):
    assert validate(with_fields(1, **fields)) == (None, errors)


@pytest.mark.parametrize(
    "fields, errors",
    [
        ({"attr": [1, 0]}, ["campaigns[1].creatives[0].attr: expected a list of positive integers"]),
        ({"attr": "1"}, ["campaigns[1].creatives[0].attr: expected a list of positive integers"]),
        ({"language": "fr-FR"}, [f"campaigns[1].creatives[0].language: {LANGUAGE}"]),
    ],
)
def test_bad_creative_response_fields_name_their_path(fields, errors):
    doc = copy.deepcopy(DOC)
    doc["campaigns"][1]["creatives"][0].update(fields)
    assert validate(doc) == (None, errors)


def test_response_fields_load_with_their_defaults():
    doc = copy.deepcopy(DOC)
    doc["campaigns"][0].update(cattax=2, language="de", dsa={"behalf": "Shop", "paid": "Shop AG"})
    doc["campaigns"][0]["creatives"][0].update(attr=[6, 1], language="fr")
    loaded = from_dict(doc).campaigns[0]
    assert (loaded.cattax, loaded.dsa) == (2, Dsa("Shop", "Shop AG", 0))
    assert [(c.attr, c.language) for c in loaded.creatives] == [((6, 1), "fr"), ((), "de")]
    plain = from_dict(DOC).campaigns[2]
    assert (plain.cattax, plain.dsa, plain.creatives[0].attr, plain.creatives[0].language) == (1, None, (), "")


def test_landing_url_is_required_by_the_click_macro_only():
    doc = copy.deepcopy(DOC)
    doc["campaigns"][1]["creatives"][0]["adm"] = '<VAST><Impression>${TAFE_IMP_URL}</Impression></VAST>'
    assert validate(doc)[1] == []  # the impression macro needs no landing page
    doc["campaigns"][1]["creatives"][0]["adm"] = '<VAST><ClickThrough>${TAFE_CLICK_URL}</ClickThrough></VAST>'
    assert validate(doc)[1] == [
        "campaigns[1].landing_url: required: campaigns[1].creatives[0].adm uses ${TAFE_CLICK_URL}"
    ]
    doc["campaigns"][1]["landing_url"] = "https://video.example/watch"
    assert from_dict(doc).campaigns[1].landing_url == "https://video.example/watch"


def test_every_error_is_collected_in_file_order():
    doc = copy.deepcopy(DOC)
    doc["score_pivot"] = 2
    doc["campaigns"][0].update(daily_budget=-1, pacing="fast")
    doc["campaigns"][0]["creatives"][1]["w"] = 0
    doc["campaigns"][2]["frequency_cap"] = {"impressions": 0, "window_s": 3600}
    doc["campaigns"].append("oops")
    campaigns_set, errors = validate(doc)
    assert campaigns_set is None
    assert errors == [
        "score_pivot: expected a number in (0, 1]",
        f"campaigns[0].daily_budget: {BUDGET}",
        'campaigns[0].pacing: expected "even" or "asap"',
        "campaigns[0].creatives[1].w: expected a positive integer",
        f"campaigns[2].frequency_cap.impressions: {CAP_N}",
        f"campaigns[{len(DOC['campaigns'])}]: expected an object",
    ]
    with pytest.raises(CampaignsError) as exc:
        from_dict(doc, source="campaigns file x.json")
    assert str(exc.value) == (
        "campaigns file x.json: score_pivot: expected a number in (0, 1] "
        "(and 5 more errors: tafe campaigns validate lists them all)"
    )
    assert "\n" not in str(exc.value)


def test_bundled_demo_set_uses_the_tracking_macros_and_money_fields():
    s = Settings()
    demo = campaigns.load(s.campaigns, seat=s.seat, currency=s.currency)
    raw = json.loads(open(s.campaigns).read())["campaigns"]
    assert "ads.tafe.example/click" not in json.dumps(raw) and "ads.tafe.example/px" not in json.dumps(raw)
    for c in demo.campaigns:
        assert c.landing_url.startswith(f"https://{c.adomain[0]}/"), c.id
        for cr in c.creatives:
            assert "${TAFE_CLICK_URL}" in cr.adm and "${TAFE_IMP_URL}" in cr.adm, cr.id
    assert {c.pacing for c in demo.campaigns} == {"even", "asap"}
    budgets = [c.budget_micros for c in demo.campaigns]
    assert 0 in budgets and all(b == 0 or 1_000_000_000 <= b <= 5_000_000_000 for b in budgets) and any(budgets)
    caps = [c.frequency_cap for c in demo.campaigns]
    assert None in caps and any(caps)
