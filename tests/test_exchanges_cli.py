"""Exchange profiles as real processes: ``tafe exchanges validate``, the start-up refusal of a bad
file, and ``tafe serve`` bidding in each exchange's seat and spending its encrypted prices."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
from conftest import start_tafe

from tafe.money.price_crypto import PriceKeys, decode_key, encrypt
from tafe.settings import DATA_DIR

# Google's documented example keys and sample price (1900 micros):
# https://developers.google.com/authorized-buyers/rtb/response-guide/decrypt-price
E_KEY, I_KEY = "skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o=", "arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo="
PUBLISHED_1900 = "YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCAWJRxOgA"
GOOD = {"adx": {"seat": "4711", "encryption_key": E_KEY, "integrity_key": I_KEY}, "ox": {"seat": "ox-9", "spend_on": "win"}}
BAD = {
    "adx": {"seat": "", "spend_on": "click", "encryption_key": E_KEY},
    "ox": {"integrity_key": "not base64!", "encryption_key": E_KEY, "notice_base_url": "notices.example", "colour": 1},
    "other": {},
    "bad name": {"network_margin_ms": -1, "gzip": "no"},
}
BAD_LINES = [
    "adx.seat: expected a seat id, 1-64 characters",
    'adx.spend_on: expected "bill" or "win"',
    "adx.integrity_key: required with encryption_key (an exchange gives both keys)",
    "ox.colour: unknown field (expected one of encryption_key, gzip, integrity_key, network_margin_ms, notice_base_url,"
    " seat, spend_on)",
    "ox.integrity_key: expected the key in base64, as the exchange gave it",
    "ox.notice_base_url: expected an absolute http or https URL",
    "other: exchange name: default and other are reserved",
    '["bad name"]: exchange name: expected 1-40 of A-Z a-z 0-9 . _ -',
    '["bad name"].network_margin_ms: expected an integer >= 0 (milliseconds)',
    '["bad name"].gzip: expected true or false',
]


def tafe(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    full_env = {"PATH": "/usr/bin:/bin", "TAFE_LOG_JSON": "0", **env}
    return subprocess.run([sys.executable, "-m", "tafe", *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def write(tmp_path, doc, name="exchanges.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_validate_prints_every_error_with_its_json_path_and_exits_1(tmp_path):
    out = tafe("exchanges", "validate", str(write(tmp_path, BAD)))
    assert (out.returncode, out.stdout.splitlines(), out.stderr) == (1, BAD_LINES, "")


def test_validate_a_good_file_prints_one_summary_line(tmp_path):
    path = write(tmp_path, GOOD)
    assert tafe("exchanges", "validate", str(path)).stdout == f"{path}: 2 exchanges OK\n"
    out = tafe("exchanges", "validate", TAFE_EXCHANGES=str(path))  # FILE defaults to the setting
    assert (out.returncode, out.stdout) == (0, f"{path}: 2 exchanges OK\n")


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "No such file or directory"), ("{not json", "Expecting property name"), ("[1]", "$: expected an object of exchange name")],
)
def test_validate_an_unreadable_file_says_why_in_one_line(tmp_path, content, why):
    path = tmp_path / "exchanges.json"
    if content is not None:
        path.write_text(content)
    out = tafe("exchanges", "validate", str(path))
    assert out.returncode == 1 and len(out.stdout.splitlines()) == 1 and why in out.stdout, out.stdout


@pytest.mark.parametrize("command", [["serve", "--workers", "1"], ["serve", "--workers", "2"], ["up"]])
def test_serve_and_up_refuse_a_bad_file_in_one_line(tmp_path, command):
    path = write(tmp_path, BAD)
    out = tafe(*command, "--port", "0", "--admin-port", "-1", "--run-dir", str(tmp_path / "run"), "--exchanges", str(path))
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"tafe: exchanges file {path}: {BAD_LINES[0]} (and {len(BAD_LINES) - 1} more errors: tafe exchanges validate"
        " lists them all)"
    )
    assert "Traceback" not in out.stderr + out.stdout


def request(url: str, method: str = "GET", path: str = "/", body: bytes | None = None) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``tafe serve`` with the GOOD profiles, over the demo campaigns each given a budget (so spend shows)."""
    tmp = tmp_path_factory.mktemp("exchanges")
    doc = json.loads((DATA_DIR / "campaigns.json").read_text())
    for c in doc["campaigns"]:
        c.setdefault("daily_budget", 1000)
    campaigns = write(tmp, doc, "campaigns.json")
    proc = start_tafe("--exchanges", str(write(tmp, GOOD)), "--campaigns", str(campaigns), "--state", str(tmp / "state"))
    yield proc
    proc.stop()


def spent(server) -> dict[str, float]:
    report = json.loads(request(server.admin_url, path="/debug/campaigns")[1])
    return {c["id"]: c["spent"] for c in report["campaigns"]}


def demo(**fields) -> bytes:
    return json.dumps({**json.loads((DATA_DIR / "demo-request.json").read_text()), **fields}).encode()


def test_wseat_naming_an_exchanges_seat_gets_a_bid_there_only(server):
    status, body = request(server.url, "POST", "/openrtb2/bid/adx", demo(wseat=["4711"]))
    assert status == 200 and json.loads(body)["seatbid"][0]["seat"] == "4711"
    assert request(server.url, "POST", "/openrtb2/bid/ox", demo(wseat=["4711"]))[0] == 204
    assert request(server.url, "POST", "/openrtb2/bid", demo(wseat=["4711"]))[0] == 204


def test_an_encrypted_billing_price_moves_spend_by_the_decrypted_price(server):
    status, body = request(server.url, "POST", "/openrtb2/bid/adx", demo(id="enc-1"))
    assert status == 200, body
    bid = json.loads(body)["seatbid"][0]["bid"][0]
    before = spent(server)[bid["cid"]]
    burl = urlsplit(bid["burl"].replace("${AUCTION_PRICE}", PUBLISHED_1900).replace("${AUCTION_CURRENCY}", "USD"))
    assert request(server.url, path=f"{burl.path}?{burl.query}")[0] == 204
    assert spent(server)[bid["cid"]] - before == pytest.approx(1900e-9, abs=1e-12)

    # A tampered price, and one encrypted with other keys, are refused and change nothing.
    status, body = request(server.url, "POST", "/openrtb2/bid/adx", demo(id="enc-2"))
    bid = json.loads(body)["seatbid"][0]["bid"][0]
    before = spent(server)[bid["cid"]]
    tampered = PUBLISHED_1900[:20] + ("A" if PUBLISHED_1900[20] != "A" else "B") + PUBLISHED_1900[21:]
    foreign = encrypt(1000, PriceKeys(decode_key(I_KEY), decode_key(E_KEY)), bytes(16))
    for price in (tampered, foreign):
        burl = urlsplit(bid["burl"].replace("${AUCTION_PRICE}", price).replace("${AUCTION_CURRENCY}", "USD"))
        assert request(server.url, path=f"{burl.path}?{burl.query}") == (400, b"bad_signature\n")
    assert spent(server)[bid["cid"]] == before
    metrics = request(server.admin_url, path="/metrics")[1].decode()
    assert 'tafe_notices_total{kind="bill",outcome="bad_signature"} 2.0' in metrics


def test_spend_on_win_for_one_exchange_only(server):
    status, body = request(server.url, "POST", "/openrtb2/bid/ox", demo(id="win-1"))
    assert status == 200, body
    bid = json.loads(body)["seatbid"][0]["bid"][0]
    before = spent(server)[bid["cid"]]
    nurl = urlsplit(bid["nurl"].replace("${AUCTION_PRICE}", "1.25").replace("${AUCTION_CURRENCY}", "USD"))
    assert request(server.url, path=f"{nurl.path}?{nurl.query}")[0] == 204
    assert spent(server)[bid["cid"]] - before == pytest.approx(1.25e-3, abs=1e-12)
    status, body = request(server.url, "POST", "/openrtb2/bid/adx", demo(id="win-2"))  # adx: spend on bill
    bid = json.loads(body)["seatbid"][0]["bid"][0]
    before = spent(server)[bid["cid"]]
    nurl = urlsplit(bid["nurl"].replace("${AUCTION_PRICE}", "1.25").replace("${AUCTION_CURRENCY}", "USD"))
    assert request(server.url, path=f"{nurl.path}?{nurl.query}")[0] == 204
    assert spent(server)[bid["cid"]] == before
