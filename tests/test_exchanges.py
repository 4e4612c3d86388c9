"""Exchange profiles in the WSGI app, called as a WSGI server would: seats, notice URLs,
deadline margins, gzip, spend_on and encrypted prices per exchange, over a real money state."""

from __future__ import annotations

import base64
import gzip
import json
import time

import pytest
from core.stub import FixedScorer, test_campaigns
from prometheus_client import CollectorRegistry
from test_handlers import BANNER, Holder, _notice, call, sample

from tafe.exchanges import ExchangesError
from tafe.handlers import make_public_app, open_money
from tafe.lifecycle import Lifecycle
from tafe.metrics import Metrics
from tafe.money import node_settings
from tafe.money.banker import period_of
from tafe.money.price_crypto import PriceKeys, decode_key, encrypt
from tafe.money.token import Keys, NoticeFields, _b64, _mac, sign, verify
from tafe.settings import Settings

# Google's documented example keys and a sample price (1900 micros), from
# https://developers.google.com/authorized-buyers/rtb/response-guide/decrypt-price
E_KEY, I_KEY = "skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o=", "arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo="
PUBLISHED_1900 = "YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCAWJRxOgA"
KEYS = PriceKeys(decode_key(E_KEY), decode_key(I_KEY))
PROFILES = {
    "adx": {"seat": "4711", "spend_on": "win", "encryption_key": E_KEY, "integrity_key": I_KEY},
    "ox": {"seat": "ox-9", "notice_base_url": "https://ox-notices.example/", "gzip": False},
    "tight": {"network_margin_ms": 96},  # the rest from the global settings
}


def banner(**fields) -> bytes:
    return json.dumps({**json.loads(BANNER), **fields}).encode()


@pytest.fixture
def node(tmp_path):
    """(app, metrics, spent(campaign) -> nanos) with the profiles above, on a money state in tmp_path."""
    path = tmp_path / "exchanges.json"
    path.write_text(json.dumps(PROFILES))
    settings = Settings().with_overrides(notice_base_url="https://bid.test", exchanges=str(path), state=str(tmp_path / "state"))
    settings = node_settings(settings)
    campaigns, metrics = test_campaigns(), Metrics(CollectorRegistry())
    money = open_money(settings, campaigns)
    app = make_public_app(
        settings, lifecycle=Lifecycle(), metrics=metrics, holder=Holder(FixedScorer()), campaigns=campaigns, money=money
    )

    def spent(campaign: str) -> int:
        account = money.state.accounts(period_of(time.time(), settings.budget_period_s)).get(campaign)
        return account.spent if account else 0

    yield app, metrics, spent
    money.state.close()


def bid_on(app, exchange: str, body: bytes = BANNER) -> dict:
    status, _, out = call(app, path=f"/openrtb2/bid/{exchange}", body=body)
    assert status == 200, (status, out)
    return json.loads(out)


def test_wseat_naming_an_exchanges_seat_bids_there_in_that_seat_and_nowhere_else(node):
    app, metrics, _ = node
    body = banner(wseat=["4711"])
    assert bid_on(app, "adx", body)["seatbid"][0]["seat"] == "4711"
    assert call(app, path="/openrtb2/bid/ox", body=body)[0] == 204
    assert call(app, path="/openrtb2/bid", body=body)[0] == 204  # the bare path: the default seat, "tafe"
    assert call(app, path="/openrtb2/bid/unlisted", body=body)[0] == 204
    assert sample(metrics, "tafe_no_bids_total", reason="blocked") == 3
    assert bid_on(app, "ox")["seatbid"][0]["seat"] == "ox-9"
    assert bid_on(app, "unlisted")["seatbid"][0]["seat"] == "tafe"


def test_bseat_blocks_only_the_exchange_that_knows_us_by_that_seat(node):
    app, _, _ = node
    body = banner(bseat=["4711"])
    assert call(app, path="/openrtb2/bid/adx", body=body)[0] == 204
    assert bid_on(app, "ox", body)["seatbid"][0]["seat"] == "ox-9"


def test_notice_base_gzip_and_deadline_margin_follow_the_exchange(node):
    app, metrics, _ = node
    (ox,) = bid_on(app, "ox")["seatbid"][0]["bid"]
    (adx,) = bid_on(app, "adx")["seatbid"][0]["bid"]
    assert ox["nurl"].startswith("https://ox-notices.example/notice/win?t=")
    assert adx["nurl"].startswith("https://bid.test/notice/win?t=")
    # gzip: false for ox, whatever it accepts; adx gets gzip once the body is large enough.
    many = banner(imp=[{"id": str(i), "banner": {"w": 300, "h": 250}} for i in range(8)], tmax=500)
    status, headers, out = call(app, path="/openrtb2/bid/ox", body=many, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and "content-encoding" not in headers and json.loads(out)["seatbid"]
    status, headers, out = call(app, path="/openrtb2/bid/adx", body=many, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip" and json.loads(gzip.decompress(out))["seatbid"]
    # tight keeps 96 ms of a 100 ms tmax for the network: less than min_budget_ms (5) is left.
    assert call(app, path="/openrtb2/bid/tight", body=banner(tmax=100))[0] == 204
    assert sample(metrics, "tafe_no_bids_total", reason="deadline") == 1
    assert call(app, path="/openrtb2/bid/tight", body=banner(tmax=200))[0] == 200
    assert call(app, path="/openrtb2/bid/adx", body=banner(tmax=100))[0] == 200


def test_the_token_names_the_exchange_of_the_bid(node):
    app, _, _ = node
    for exchange, named in (("adx", "adx"), ("ox", "ox"), ("unlisted", "")):
        (b,) = bid_on(app, exchange)["seatbid"][0]["bid"]
        token = b["burl"].split("t=")[1].split("&")[0]
        payload = base64.urlsafe_b64decode(token.split(".")[1] + "==").decode()
        assert payload.split("\x1f")[10] == named  # the exchange field (first-price fields follow it)


def test_a_token_from_before_exchanges_were_named_reads_as_the_default_exchange():
    keys = Keys.parse("k1:0123456789abcdef0123")
    f = NoticeFields("r", "i", "b", "c", "cr", "u", 1_000_000, 1_700_000_000, "m", "")
    raw = "\x1f".join((f.request_id, f.imp_id, f.bid_id, f.campaign, f.creative, f.user, "1000000", "1700000000", "m", ""))
    signed = f"k1.{_b64(raw.encode())}"  # a ten-field payload, signed as tokens were
    assert verify(f"{signed}.{_mac(keys.secrets['k1'], signed)}", keys, f.ts, 3600) == f
    assert sign(f, keys) != f"{signed}.{_mac(keys.secrets['k1'], signed)}"  # today's tokens carry the eleventh field


def test_encrypted_billing_price_moves_spend_by_the_decrypted_price(node):
    app, metrics, spent = node
    (b,) = bid_on(app, "adx")["seatbid"][0]["bid"]
    before = spent(b["cid"])
    assert _notice(app, b["burl"], price=PUBLISHED_1900)[0] == 204
    assert _notice(app, b["burl"], price=PUBLISHED_1900)[0] == 204  # a retry: counted once
    assert spent(b["cid"]) - before == 1900
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="accepted") == 1
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="duplicate") == 1
    (b,) = bid_on(app, "adx")["seatbid"][0]["bid"]
    price = encrypt(1_500_000, KEYS, b"0123456789abcdef")  # 1.50 CPM, under our 2.00
    assert _notice(app, b["burl"], price=price)[0] == 204
    assert spent(b["cid"]) - before == 1900 + 1_500_000


def test_tampered_foreign_or_overpriced_encrypted_prices_change_nothing(node):
    app, metrics, spent = node
    (b,) = bid_on(app, "adx")["seatbid"][0]["bid"]
    before = spent(b["cid"])
    raw = bytearray(base64.urlsafe_b64decode(PUBLISHED_1900 + "=="))
    raw[18] ^= 0x40  # in the encrypted price
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    status, _, body = _notice(app, b["burl"], price=tampered)
    assert (status, body) == (400, b"bad_signature\n")
    other = PriceKeys(decode_key(I_KEY), decode_key(E_KEY))  # signed with keys that are not adx's
    assert _notice(app, b["burl"], price=encrypt(1000, other, bytes(16)))[0] == 400
    assert _notice(app, b["burl"], price=encrypt(2_000_100, KEYS, bytes(16)))[0] == 400  # above our bid
    assert spent(b["cid"]) == before
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="bad_signature") == 2
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="bad_price") == 1
    assert _notice(app, b["burl"], price=PUBLISHED_1900)[0] == 204  # the genuine one still counts


def test_an_exchange_without_keys_logs_its_encrypted_price_and_spends_nothing(node):
    app, metrics, spent = node
    (b,) = bid_on(app, "ox")["seatbid"][0]["bid"]
    before = spent(b["cid"])
    assert _notice(app, b["burl"].replace("https://ox-notices.example", "https://bid.test"), price=PUBLISHED_1900)[0] == 202
    assert spent(b["cid"]) == before
    assert sample(metrics, "tafe_notices_total", kind="bill", outcome="encrypted_price") == 1


def test_spend_on_follows_the_exchange(node):
    app, _, spent = node
    (adx,) = bid_on(app, "adx")["seatbid"][0]["bid"]  # spend_on: win
    before = spent(adx["cid"])
    assert _notice(app, adx["nurl"], price=PUBLISHED_1900)[0] == 204
    assert spent(adx["cid"]) - before == 1900
    (ox,) = bid_on(app, "ox")["seatbid"][0]["bid"]  # spend_on: bill, the default
    assert _notice(app, ox["nurl"].replace("https://ox-notices.example", "https://bid.test"), price="1.0")[0] == 204
    assert spent(adx["cid"]) - before == 1900


def test_a_bad_exchanges_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "exchanges.json"
    path.write_text(json.dumps({"adx": {"seat": 7, "spend_on": "click"}}))
    settings = node_settings(Settings().with_overrides(exchanges=str(path), state=str(tmp_path / "state")))
    with pytest.raises(ExchangesError) as err:
        make_public_app(
            settings, lifecycle=Lifecycle(), metrics=Metrics(CollectorRegistry()), holder=Holder(FixedScorer()),
            campaigns=test_campaigns(),
        )  # fmt: skip
    assert str(err.value) == (
        f"exchanges file {path}: adx.seat: expected a seat id, 1-64 characters"
        " (and 1 more error: tafe exchanges validate lists them all)"
    )
