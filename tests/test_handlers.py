"""The WSGI handlers, called as a WSGI server would: real environ dicts, real bodies, real metrics."""

from __future__ import annotations

import gzip
import io
import json
import logging
import time
import zlib

import pytest
from core.stub import CORPUS, FixedScorer, test_campaigns
from prometheus_client import CollectorRegistry

from tafe.handlers import make_admin_app, make_public_app
from tafe.handlers.bid import accepts_gzip
from tafe.lifecycle import Lifecycle
from tafe.metrics import Metrics
from tafe.settings import Settings

BANNER = json.dumps(
    {"id": "req-1", "imp": [{"id": "1", "banner": {"w": 300, "h": 250}, "bidfloor": 0.5}], "site": {"domain": "a.example"}}
).encode()
NO_FIT = json.dumps({"id": "req-2", "imp": [{"id": "1", "banner": {"w": 1, "h": 1}}]}).encode()


class Holder:
    def __init__(self, snapshot) -> None:
        self.current = snapshot


class Exploding(FixedScorer):
    def score(self, request, imp, now):
        raise RuntimeError("model bug")


def call(app, method="POST", path="/openrtb2/bid", body=b"", headers=None, query="", environ=None):
    env = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)) if body else "",
    }
    for name, value in (headers or {}).items():
        env["HTTP_" + name.upper().replace("-", "_")] = value
    env.update(environ or {})
    seen = {}

    def start_response(status, hdrs, exc_info=None):
        seen["status"], seen["headers"] = status, hdrs

    out = b"".join(app(env, start_response))
    hdrs = {k.lower(): v for k, v in seen["headers"]}
    status = int(seen["status"][:3])
    # Every answer states its length, except a 204, which must not (RFC 9110 8.6).
    assert hdrs.get("content-length") == (None if status == 204 else str(len(out))), (status, hdrs)
    return status, hdrs, out


def sample(metrics, name, **labels):
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


@pytest.fixture
def env():
    """(app, metrics, lifecycle) over the test campaigns and a stand-in scorer, factory with settings overrides."""

    def make(scorer=None, **overrides):
        settings = Settings().with_overrides(**{"notice_base_url": "https://bid.test", **overrides})
        metrics = Metrics(CollectorRegistry())
        lifecycle = Lifecycle()
        app = make_public_app(
            settings, lifecycle=lifecycle, metrics=metrics, holder=Holder(scorer or FixedScorer()), campaigns=test_campaigns()
        )
        return app, metrics, lifecycle

    return make


def test_bid(env):
    app, metrics, _ = env()
    status, headers, body = call(app, body=BANNER, headers={"X-Openrtb-Version": "2.5"})
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["x-openrtb-version"] == "2.5"
    resp = json.loads(body)
    assert resp["id"] == "req-1" and resp["cur"] == "USD"
    (bid,) = resp["seatbid"][0]["bid"]
    assert resp["seatbid"][0]["seat"] == "tafe"
    assert bid["impid"] == "1" and bid["price"] == 2.0 and bid["w"] == 300 and bid["h"] == 250 and bid["mtype"] == 1
    assert bid["nurl"].startswith("https://bid.test/notice/win?t=")
    assert "${AUCTION_PRICE}" in bid["burl"] and "${AUCTION_LOSS}" in bid["lurl"]
    assert resp["ext"]["cqs"]["model"] == "stub-1"
    assert sample(metrics, "tafe_bids_total", exchange="default") == 1
    assert sample(metrics, "tafe_http_requests_total", route="bid", status="200") == 1
    assert sample(metrics, "tafe_bid_price_cpm_count") == 1
    assert sample(metrics, "tafe_http_requests_in_flight") == 0


def test_exchange_in_path_is_recorded(env):
    app, metrics, _ = env()
    assert call(app, path="/openrtb2/bid/adx", body=BANNER)[0] == 200
    assert call(app, path="/openrtb2/bid/" + "x" * 200, body=BANNER)[0] == 200
    assert sample(metrics, "tafe_bids_total", exchange="adx") == 1
    assert sample(metrics, "tafe_bids_total", exchange="other") == 1


def test_unknown_version_header_answers_ours(env):
    app, _, _ = env()
    assert call(app, body=BANNER, headers={"X-Openrtb-Version": "9.9"})[1]["x-openrtb-version"] == "2.6"
    assert call(app, body=BANNER)[1]["x-openrtb-version"] == "2.6"


def test_no_bid_is_204_empty_and_counted(env):
    app, metrics, _ = env()
    status, _, body = call(app, body=NO_FIT)
    assert (status, body) == (204, b"")
    assert sample(metrics, "tafe_no_bids_total", reason="no_eligible_campaign") == 1


FULL_2_6_8 = "COzTVhaOzTVhaGvAAAENAiCIAP_AAH_AAAAAAEEUACCKAAA"  # core/test_privacy.py: purposes 1-10, vendors 2, 6, 8


def gdpr_banner(consent: str) -> bytes:
    return json.dumps({**json.loads(BANNER), "user": {"buyeruid": "u", "consent": consent}, "regs": {"gdpr": 1}}).encode()


def test_privacy_rules_use_the_vendor_id_setting_and_are_counted(env):
    app, metrics, _ = env(gvl_vendor_id=3)
    assert call(app, body=gdpr_banner("BON"))[0] == 204
    assert sample(metrics, "tafe_no_bids_total", reason="privacy") == 1
    assert sample(metrics, "tafe_privacy_total", decision="no_bid", reason="gdpr_bad_consent") == 1
    assert call(app, body=gdpr_banner(FULL_2_6_8))[0] == 200  # not our vendor: a contextual bid
    assert sample(metrics, "tafe_privacy_total", decision="no_history", reason="gdpr_no_vendor") == 1
    app, metrics, _ = env(gvl_vendor_id=2)
    assert call(app, body=gdpr_banner(FULL_2_6_8))[0] == 200
    assert metrics.registry.get_sample_value("tafe_privacy_total", {"decision": "no_history", "reason": "gdpr_no_vendor"}) is None


def test_nbr_mode(env):
    app, _, _ = env(nbr_in_response=True)
    status, headers, body = call(app, body=NO_FIT)
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"id": "req-2", "nbr": 0}


@pytest.mark.parametrize("path", sorted((CORPUS / "invalid").glob("*.json")), ids=lambda p: p.stem)
def test_malformed_is_400_with_reason(env, path):
    app, metrics, _ = env()
    reason = json.loads(path.with_suffix(".expect").read_text())["reason"]
    status, headers, body = call(app, body=path.read_bytes())
    assert status == 400
    assert body.decode().strip() == reason
    assert sample(metrics, "tafe_bad_requests_total", reason=reason) == 1
    assert sample(metrics, "tafe_http_requests_total", route="bid", status="400") == 1


def test_gzip_request(env):
    app, _, _ = env()
    status, _, body = call(app, body=gzip.compress(BANNER), headers={"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(body)["id"] == "req-1"


def test_gzip_bomb_is_413_without_inflating_it(env):
    app, metrics, _ = env(max_inflated_bytes=64 * 1024)
    bomb = gzip.compress(b"{" + b" " * (50 * 1024 * 1024) + b"}", 9)  # 50 MB of spaces in ~50 KB
    assert len(bomb) < 100 * 1024
    status, _, body = call(app, body=bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and body == b"too_large\n"
    assert sample(metrics, "tafe_bad_requests_total", reason="too_large") == 1


@pytest.mark.parametrize("body", [b"not gzip at all", gzip.compress(BANNER)[:-12]], ids=["garbage", "truncated"])
def test_bad_gzip_is_400(env, body):
    app, _, _ = env()
    status, _, out = call(app, body=body, headers={"Content-Encoding": "gzip"})
    assert (status, out) == (400, b"bad_gzip\n")


def test_unknown_content_encoding_is_415(env):
    app, _, _ = env()
    assert call(app, body=BANNER, headers={"Content-Encoding": "br"})[0] == 415


def test_body_over_cap_is_413(env):
    app, _, _ = env(max_body_bytes=1024)
    assert call(app, body=b"{" + b" " * 2000 + b"}")[0] == 413
    # no Content-Length (a chunked body the server has terminated): still capped
    assert call(app, body=b"{" + b" " * 2000 + b"}", environ={"CONTENT_LENGTH": ""})[0] == 413
    assert call(app, body=BANNER, environ={"CONTENT_LENGTH": ""})[0] == 200


def test_response_gzip_when_accepted_and_worth_it(env):
    app, _, _ = env(gzip_min_bytes=100)
    status, headers, body = call(app, body=BANNER, headers={"Accept-Encoding": "gzip, deflate"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(body))["id"] == "req-1"
    app, _, _ = env(gzip_min_bytes=1_000_000)
    status, headers, body = call(app, body=BANNER, headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in headers and json.loads(body)["id"] == "req-1"
    app, _, _ = env(gzip_min_bytes=100)
    assert "content-encoding" not in call(app, body=BANNER)[1]


@pytest.mark.parametrize("value, expected", [
    ("gzip", True), ("gzip, deflate, br", True), ("x-gzip", True), ("*", True), ("GZip", True),
    ("", False), ("identity", False), ("deflate, br", False),
    ("gzip;q=0, identity", False), ("gzip; q=0.5", True), ("br;q=1, GZIP;Q=0", False),
    ("*;q=0", False), ("deflate;q=1, *;q=0.1", True), ("*;q=1, gzip;q=0", False), ("gzip;q=oops", False),
])
def test_accept_encoding_weights(value, expected):
    assert accepts_gzip(value) is expected


def test_response_not_gzipped_when_refused_by_weight(env):
    app, _, _ = env(gzip_min_bytes=100)
    status, headers, body = call(app, body=BANNER, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert status == 200 and "content-encoding" not in headers and json.loads(body)["id"] == "req-1"


def test_gzip_members_are_one_body_and_trailing_bytes_refused(env):
    app, _, _ = env()
    half = len(BANNER) // 2
    members = gzip.compress(BANNER[:half]) + gzip.compress(BANNER[half:])
    assert call(app, body=members, headers={"Content-Encoding": "gzip"})[0] == 200
    assert call(app, body=gzip.compress(BANNER) + b"\0" * 8, headers={"Content-Encoding": "gzip"})[0] == 200
    status, _, out = call(app, body=gzip.compress(BANNER) + b"junk", headers={"Content-Encoding": "gzip"})
    assert (status, out) == (400, b"bad_gzip\n")
    app, _, _ = env(max_inflated_bytes=len(BANNER) - 1)  # each member fits, the whole does not
    assert call(app, body=members, headers={"Content-Encoding": "gzip"})[0] == 413
    app, _, _ = env()
    many = gzip.compress(BANNER) + gzip.compress(b"") * 100  # a CPU sink, not a body
    assert call(app, body=many, headers={"Content-Encoding": "gzip"})[:3:2] == (400, b"bad_gzip\n")


def test_deadline_already_short_at_arrival(env):
    app, metrics, _ = env(nbr_in_response=True)
    late = json.dumps({"id": "r", "tmax": 12, "imp": [{"id": "1", "banner": {"w": 300, "h": 250}}]}).encode()
    status, _, body = call(app, body=late)  # 12 - 10 ms margin < 5 ms minimum budget
    assert status == 200 and json.loads(body) == {"id": "r", "nbr": 15}
    assert sample(metrics, "tafe_no_bids_total", reason="deadline") == 1
    assert sample(metrics, "tafe_requests_over_deadline_total") == 1


def test_deadline_passed_while_queued(env):
    app, metrics, _ = env()
    status, _, body = call(app, body=BANNER, environ={"tafe.arrival": time.monotonic() - 1.0})
    assert (status, body) == (204, b"")
    assert sample(metrics, "tafe_requests_over_deadline_total") == 1


def test_deadline_capped_by_max_tmax(env):
    app, _, _ = env(max_tmax_ms=50)
    slow = json.dumps({"id": "r", "tmax": 5000, "imp": [{"id": "1", "banner": {"w": 300, "h": 250}}]}).encode()
    assert call(app, body=slow, environ={"tafe.arrival": time.monotonic() - 0.2})[0] == 204
    assert call(app, body=slow)[0] == 200


def test_unexpected_error_is_500_and_app_lives(env):
    app, metrics, _ = env(scorer=Exploding())
    status, _, body = call(app, body=BANNER)
    assert status == 500 and b"model bug" not in body
    assert sample(metrics, "tafe_http_requests_total", route="bid", status="500") == 1
    assert sample(metrics, "tafe_http_requests_in_flight") == 0
    assert call(app, body=NO_FIT)[0] == 204  # the same app keeps answering


def test_ping_and_draining(env):
    app, _, lifecycle = env()
    assert call(app, "GET", "/ping")[0::2] == (200, b"pong\n")
    lifecycle.start_draining()
    assert call(app, "GET", "/ping")[0] == 503


def test_routes_404_405(env):
    app, metrics, _ = env()
    assert call(app, "GET", "/nope")[0] == 404
    assert call(app, "GET", "/openrtb2/bidder")[0] == 404
    status, headers, _ = call(app, "GET", "/openrtb2/bid")
    assert status == 405 and headers["allow"] == "POST"
    assert call(app, "POST", "/ping")[0] == 405
    assert call(app, "PUT", "/notice/win")[0] == 405
    assert call(app, "GET", "/notice/click")[0] == 404
    assert sample(metrics, "tafe_http_requests_total", route="other", status="404") == 2


def _notice(app, url, price="1.23", **macros):
    """Call a notice URL as the exchange would, macros filled in."""
    path, _, query = url.removeprefix("https://bid.test").partition("?")
    fill = {"${AUCTION_PRICE}": price, "${AUCTION_CURRENCY}": "USD", "${AUCTION_LOSS}": "102", "${AUCTION_MIN_TO_WIN}": "1.1"}
    fill.update(macros)
    for macro, value in fill.items():
        query = query.replace(macro, value)
    return call(app, "GET", path, query=query)


def test_notices_round_trip_from_a_bid(env):
    app, metrics, _ = env()
    bid = json.loads(call(app, body=BANNER)[2])["seatbid"][0]["bid"][0]
    for kind, url in (("win", bid["nurl"]), ("bill", bid["burl"]), ("loss", bid["lurl"])):
        assert _notice(app, url)[0] == 204
        assert sample(metrics, "tafe_notices_total", kind=kind, outcome="accepted") == 1


def test_bill_notice_counts_once_and_moves_spend(env):
    app, metrics, _ = env()
    bid = json.loads(call(app, body=BANNER)[2])["seatbid"][0]["bid"][0]
    for _ in range(3):
        assert _notice(app, bid["burl"], price="1.5")[0] == 204
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="accepted") == 1
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="duplicate") == 2


def test_forged_and_tampered_notices_are_refused(env):
    app, metrics, _ = env()
    assert call(app, "GET", "/notice/bill", query="r=x&i=1&b=y&p=999999")[0] == 403  # the old, unsigned form
    bid = json.loads(call(app, body=BANNER)[2])["seatbid"][0]["bid"][0]
    token = bid["burl"].split("t=")[1].split("&")[0]
    tampered = bid["burl"].replace(token, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    assert _notice(app, tampered)[0] == 403
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="unsigned") == 1
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="bad_token") == 1
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="accepted") == 0


@pytest.mark.parametrize(
    "price,status,outcome",
    [
        ("WEp8nGN8dZf7zQ-cDgYJdA", 202, "encrypted_price"),
        ("${AUCTION_PRICE}", 400, "bad_price"),
        ("-1", 400, "bad_price"),
        ("inf", 400, "bad_price"),
        ("nan", 400, "bad_price"),
        ("", 400, "bad_price"),
        ("%ZZ", 400, "bad_price"),
        ("999", 400, "bad_price"),  # above our own bid price
        ("2.0", 204, "accepted"),  # exactly our bid price
    ],
)
def test_notice_prices(env, price, status, outcome):
    app, metrics, _ = env()
    bid = json.loads(call(app, body=BANNER)[2])["seatbid"][0]["bid"][0]
    assert bid["price"] == 2.0
    assert _notice(app, bid["nurl"], price=price)[0] == status
    assert sample(metrics, "tafe_notices_total", kind="win", outcome=outcome) == 1


def test_click_redirects_only_to_the_declared_landing_url(env):
    app, metrics, _ = env()
    bid = json.loads(call(app, body=BANNER)[2])["seatbid"][0]["bid"][0]
    click = bid["adm"].split('href="')[1].split('"')[0] if "/track/click" in bid["adm"] else None
    if click is None:  # the test campaign's markup has no click macro: build the URL from the pixel's token
        click = bid["nurl"].replace("/notice/win", "/track/click").split("&")[0]
    status, headers, _ = _notice(app, click)
    landing = test_campaigns().by_id[bid["cid"]].landing_url
    if landing:
        assert (status, headers["location"]) == (302, landing)
    else:
        assert status == 404
    status, headers, _ = call(app, "GET", "/track/click", query="t=k.x.y&url=https://evil.example")
    assert status == 403 and "location" not in headers


def test_admin_app():
    metrics = Metrics(CollectorRegistry())
    lifecycle = Lifecycle()

    def debug(environ, start_response):
        start_response("200 OK", [("Content-Length", "0"), ("X-Path", environ["SCRIPT_NAME"] + "|" + environ["PATH_INFO"])])
        return [b""]

    app = make_admin_app(Settings(), lifecycle=lifecycle, metrics=metrics, mounts={"/debug/blocking": debug})
    metrics.bids.labels("adx").inc()
    status, headers, body = call(app, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b'tafe_bids_total{exchange="adx"} 1.0' in body
    assert call(app, "GET", "/ping")[0::2] == (200, b"pong\n")
    assert call(app, "GET", "/debug/blocking/top")[1]["x-path"] == "/debug/blocking|/top"
    assert call(app, "GET", "/debug/blockingX")[0] == 404
    assert call(app, "POST", "/metrics")[0] == 405
    lifecycle.start_draining()
    assert call(app, "GET", "/ping")[0] == 503


@pytest.mark.parametrize("length", ["-1", "abc", "1e3"])
def test_bad_content_length_is_400(env, length):
    app, _, _ = env()
    status, _, body = call(app, body=BANNER, environ={"CONTENT_LENGTH": length})
    assert (status, body) == (400, b"bad_content_length\n")


def test_x_gzip_and_identity_encodings(env):
    app, _, _ = env()
    assert call(app, body=gzip.compress(BANNER), headers={"Content-Encoding": "x-gzip"})[0] == 200
    assert call(app, body=BANNER, headers={"Content-Encoding": "identity"})[0] == 200
    assert call(app, body=zlib.compress(BANNER), headers={"Content-Encoding": "deflate"})[0] == 415


def test_gzip_bomb_within_wire_cap_but_over_inflate_cap_by_one_byte(env):
    app, _, _ = env(max_inflated_bytes=len(BANNER))
    assert call(app, body=gzip.compress(BANNER), headers={"Content-Encoding": "gzip"})[0] == 200
    padded = BANNER + b" "
    assert call(app, body=gzip.compress(padded), headers={"Content-Encoding": "gzip"})[0] == 413


def test_notice_urls_default_to_the_host_the_exchange_used(env):
    app, _, _ = env(notice_base_url="")
    bid = json.loads(call(app, body=BANNER, headers={"Host": "bidder.example:8443"})[2])["seatbid"][0]["bid"][0]
    assert bid["nurl"].startswith("http://bidder.example:8443/notice/win?")
    odd = {"Host": "evil.example/<script>"}
    server = {"SERVER_NAME": "10.0.0.5", "SERVER_PORT": "8080", "wsgi.url_scheme": "https"}
    bid = json.loads(call(app, body=BANNER, headers=odd, environ=server)[2])["seatbid"][0]["bid"][0]
    assert bid["nurl"].startswith("https://10.0.0.5:8080/notice/win?")
    bid = json.loads(call(app, body=BANNER, headers={"Host": "[::1]:9000"})[2])["seatbid"][0]["bid"][0]
    assert bid["burl"].startswith("http://[::1]:9000/notice/bill?")
    # Behind Nginx terminating TLS: the scheme it was reached by, from X-Forwarded-Proto.
    tls = {"Host": "bidder.example", "X-Forwarded-Proto": "https"}
    bid = json.loads(call(app, body=BANNER, headers=tls)[2])["seatbid"][0]["bid"][0]
    assert bid["nurl"].startswith("https://bidder.example/notice/win?")
    tls["X-Forwarded-Proto"] = "gopher"
    bid = json.loads(call(app, body=BANNER, headers=tls)[2])["seatbid"][0]["bid"][0]
    assert bid["nurl"].startswith("http://bidder.example/notice/win?")


def test_no_bid_reasons_logged_at_debug_only(env, caplog):
    app, _, _ = env()
    with caplog.at_level(logging.DEBUG, logger="tafe.bid"):
        call(app, body=NO_FIT)
    assert not [r for r in caplog.records if r.name == "tafe.bid"]  # the level is read once, when the app is built
    with caplog.at_level(logging.DEBUG, logger="tafe.bid"):
        app, _, _ = env()
        call(app, path="/openrtb2/bid/adx", body=NO_FIT)
        call(app, body=b"{")
    messages = [(r.getMessage(), getattr(r, "fields", {})) for r in caplog.records if r.name == "tafe.bid"]
    assert ("no bid: no_eligible_campaign", {"request": "req-2", "exchange": "adx"}) in messages
    assert ("bad request: not_json", {}) in messages


def test_unexpected_error_is_logged_with_its_traceback(env, caplog):
    app, _, _ = env(scorer=Exploding())
    with caplog.at_level(logging.ERROR):
        call(app, body=BANNER)
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info and "model bug" in str(record.exc_info[1])


def direct(app, method="POST", path="/openrtb2/bid", body=b"", headers=None):
    """The same request through the app's fast path (``handle``), as TAFE's server makes it."""
    env = {"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "wsgi.url_scheme": "http", "REQUEST_METHOD": method, "PATH_INFO": path}
    for name, value in (headers or {}).items():
        env["HTTP_" + name.upper().replace("-", "_")] = value
    env.update({"tafe.body": body, "tafe.arrival": time.monotonic()})
    return app.handle(method, path, env)


@pytest.mark.parametrize(
    "method, path, body, headers",
    [
        ("POST", "/openrtb2/bid", BANNER, {"X-Openrtb-Version": "2.5"}),
        ("POST", "/openrtb2/bid/exchange-a", BANNER, {}),
        ("POST", "/openrtb2/bid", NO_FIT, {}),
        ("POST", "/openrtb2/bid", gzip.compress(BANNER), {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"}),
        ("POST", "/openrtb2/bid", b"{not json", {}),
        ("POST", "/openrtb2/bid", BANNER, {"Content-Encoding": "br"}),
        ("POST", "/openrtb2/bid", b"x" * 70000, {}),
        ("GET", "/openrtb2/bid", b"", {}),
    ],
    ids=["bid", "exchange", "no-bid", "gzip", "malformed", "encoding", "too-large", "get"],
)
def test_direct_handle_answers_as_the_wsgi_app(env, method, path, body, headers):
    app, metrics, _ = env(max_body_bytes=65536, gzip_min_bytes=1)
    status, hdrs, out = call(app, method, path, body, headers)
    d_status, d_headers, d_out = direct(app, method, path, body, headers)
    assert int(d_status[:3]) == status
    assert {k.lower(): v for k, v in d_headers} == {k: v for k, v in hdrs.items() if k != "content-length"}
    if status == 200 and "content-encoding" not in hdrs:  # bids carry signed notice tokens with a timestamp
        assert json.loads(d_out)["seatbid"][0]["bid"][0]["price"] == json.loads(out)["seatbid"][0]["bid"][0]["price"]
    elif status != 200:
        assert d_out == out
    assert sample(metrics, "tafe_http_requests_total", route="bid", status=str(status)) == 2


def test_direct_handle_leaves_other_routes_to_wsgi(env):
    app, _, _ = env()
    for path in ("/ping", "/notice/win", "/track/imp", "/nope"):
        assert direct(app, "GET", path) is None
