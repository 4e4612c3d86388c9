"""Every real request in ../shared/openrtb/examples through the WSGI app built as ``tafe serve`` builds it.

The bundled demo campaigns and the committed demo CQS model, no user store: every user
is unknown and scored from the request alone. Each example must get a well-formed
BidResponse or a no-bid (never 400/5xx), and most of those whose imps fit a demo
creative must get a bid.
"""

from __future__ import annotations

import io
import json

import pytest
from conftest import shared_examples
from prometheus_client import CollectorRegistry

from tafe.core.request import parse
from tafe.handlers import build
from tafe.settings import Settings

EXAMPLES = shared_examples()


@pytest.fixture(scope="module")
def apps():
    return build(Settings(), registry=CollectorRegistry())


def post(app, body: bytes):
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/openrtb2/bid", "QUERY_STRING": "", "wsgi.input": io.BytesIO(body),
           "CONTENT_LENGTH": str(len(body))}
    seen = {}
    out = b"".join(app(env, lambda status, headers, exc_info=None: seen.update(status=status)))
    return int(seen["status"][:3]), out


def fits_a_demo_creative(apps, body: bytes) -> bool:
    request = parse(body)
    return any(apps.campaigns.candidates(imp) for imp in request.imps)


def test_examples_are_there():
    assert len(EXAMPLES) >= 20


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_gets_a_well_formed_answer(apps, path):
    raw = path.read_bytes()
    request = json.loads(raw)
    status, body = post(apps.public, raw)
    assert status in (200, 204), body[:200]
    if status == 204:
        assert body == b""
        return
    resp = json.loads(body)
    assert resp["id"] == request["id"]
    assert resp["cur"] in (request.get("cur") or ["USD"])
    imps = {imp["id"]: imp for imp in request["imp"]}
    bids = [bid for seat in resp["seatbid"] for bid in seat["bid"]]
    assert bids and len({b["impid"] for b in bids}) == len(bids)
    for bid in bids:
        imp = imps[bid["impid"]]
        assert bid["id"] and bid["crid"] and bid["cid"] and bid["adomain"] and bid["adm"] and bid["nurl"]
        assert bid["mtype"] in (1, 2, 3, 4)
        if imp.get("bidfloorcur", "USD") == "USD":
            assert bid["price"] >= imp.get("bidfloor", 0)
        assert bid["price"] > 0
        if bid["mtype"] == 1:
            sizes = [(f["w"], f["h"]) for f in imp["banner"].get("format", []) if "w" in f]
            if imp["banner"].get("w") and imp["banner"].get("h"):
                sizes.append((imp["banner"]["w"], imp["banner"]["h"]))
            assert not sizes or (bid["w"], bid["h"]) in sizes
        if imp.get("secure"):
            assert "http://" not in bid["adm"]
    assert resp["ext"]["cqs"]["model"] == apps.holder.current.versions["model"]


def test_most_fitting_examples_get_a_bid(apps):
    fitting = [p for p in EXAMPLES if fits_a_demo_creative(apps, p.read_bytes())]
    bid_on = [p.stem for p in fitting if post(apps.public, p.read_bytes())[0] == 200]
    assert len(fitting) >= 0.8 * len(EXAMPLES)
    assert len(bid_on) >= 0.8 * len(fitting), sorted(set(p.stem for p in fitting) - set(bid_on))


def test_decision_log_is_written_when_configured(tmp_path):
    log = tmp_path / "decisions.jsonl"
    apps = build(Settings(decision_log=str(log), decision_log_sample=1.0), registry=CollectorRegistry())
    body = (EXAMPLES[0].parent / "pbs-ix-multi-imp-5.json").read_bytes()
    status, out = post(apps.public, body)
    assert status == 200
    bids = json.loads(out)["seatbid"][0]["bid"]
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(line["bid_id"] for line in lines) == sorted(b["id"] for b in bids)
    assert all(line["model"] == apps.holder.current.versions["model"] and line["features"] for line in lines)


def test_model_versions_follow_a_hot_swap(apps):
    import dataclasses

    from tafe.cqs import Snapshot

    old = apps.holder.current
    new = Snapshot(dataclasses.replace(old.model, version="swapped-1"))
    apps.holder.swap(new)
    try:
        status, out = post(apps.public, EXAMPLES[0].read_bytes())
        assert status == 200 and json.loads(out)["ext"]["cqs"]["model"] == "swapped-1"
        assert apps.metrics.registry.get_sample_value("tafe_cqs_active_info", {"kind": "model", "version": "swapped-1"}) == 1
    finally:
        apps.holder.swap(old)


def test_tafe_wsgi_application_takes_settings_from_the_environment(monkeypatch):
    import importlib

    monkeypatch.setenv("TAFE_SEAT", "env-seat")
    monkeypatch.setenv("TAFE_NOTICE_BASE_URL", "https://notices.example")
    import tafe.wsgi

    module = importlib.reload(tafe.wsgi)
    status, out = post(module.application, (EXAMPLES[0].parent / "iab-2.6-simple-banner.json").read_bytes())
    assert status == 200
    (seat,) = json.loads(out)["seatbid"]
    assert seat["seat"] == "env-seat" and seat["bid"][0]["nurl"].startswith("https://notices.example/notice/win?")
