"""The money loop on a whole node: ``tafe up`` (real Nginx, two pre-forked workers), real HTTP.

Billing retries count once whichever worker gets them; forged, tampered, expired and
overpriced notices change nothing; a click goes only where the campaign file says; a
frequency cap holds across workers; a simulated exchange finds an asap budget stopped
within 1% (plus one impression) and an even one on its line at each quarter of a 60 s
period; ``kill -9`` of a worker loses no committed spend.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_master import Proc, alive, children, request, scrape
from test_up import UP_RE, free_port

from tafe import nginx as nginx_mod
from tafe.money.token import Keys, NoticeFields, sign
from tafe.settings import Settings

from .exchange import Exchange

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(nginx_mod.find_binary(Settings()) is None, reason="nginx not installed (.ci/run installs it)"),
]

KEYS = "k1:test-notice-secret-0123456789"
PERIOD_S = 60


def _creative(cid: str, w: int, h: int) -> dict:
    adm = f'<a href="${{TAFE_CLICK_URL}}"><img src="https://cdn.example/{cid}.png"></a><img src="${{TAFE_IMP_URL}}">'
    return {"id": f"{cid}-{w}x{h}", "format": "banner", "w": w, "h": h, "adm": adm}


def _campaign(cid: str, w: int, h: int, **money: object) -> dict:
    return {
        "id": cid, "advertiser": cid, "adomain": [f"{cid}.example"], "base_cpm": 2.0, "max_cpm": 3.0,
        "landing_url": f"https://{cid}.example/landing?src=tafe", "creatives": [_creative(cid, w, h)], **money,
    }  # fmt: skip


CAMPAIGNS = {
    "currency": "USD",
    "score_pivot": 0.001,  # every user is worth max_cpm: prices do not depend on the model
    "campaigns": [
        _campaign("c-asap", 300, 250, daily_budget=0.4, pacing="asap"),
        _campaign("c-even", 728, 90, daily_budget=0.3, pacing="even"),
        _campaign("c-capped", 320, 50, frequency_cap={"impressions": 3, "window_s": 3600}),
        _campaign("c-bill", 160, 600, daily_budget=100, pacing="asap"),
    ],
}


class Node:
    def __init__(self, tmp: Path, *args: str) -> None:
        path = tmp / "campaigns.json"
        path.write_text(json.dumps(CAMPAIGNS))
        self.state = tmp / "state"
        self.proc = Proc(
            "up", "--workers", "2", "--port", str(free_port()), "--admin-port", "0", "--drain-grace-s", "0.5",
            "--campaigns", str(path), "--state", str(self.state), "--reservation-ttl-s", "10", *args,
            env={"TAFE_NOTICE_KEYS": KEYS},
        )  # fmt: skip
        m = self.proc.wait_for(UP_RE, timeout=60)
        self.url, self.worker_url, self.admin_url = m.group(1), m.group(3), m.group(5)
        self.nginx_pid = int(m.group(2))

    def workers(self) -> list[int]:
        return sorted(p for p in children(self.proc.pid) if alive(p) and p != self.nginx_pid)

    def campaigns(self) -> dict[str, dict]:
        status, _, body = request(self.admin_url, path="/debug/campaigns")
        assert status == 200, body
        return {c["id"]: c for c in json.loads(body)["campaigns"]}

    def bid(self, w: int, h: int, user: str = "u1", url: str | None = None) -> tuple[int, dict]:
        body = {
            "id": f"r-{time.monotonic_ns()}", "imp": [{"id": "1", "banner": {"w": w, "h": h}}],
            "site": {"domain": "news.example"}, "user": {"id": user}, "device": {"ip": "192.0.2.1"},
        }  # fmt: skip
        status, _, out = request(url or self.url, "POST", "/openrtb2/bid", json.dumps(body).encode(), {"Content-Type": "application/json"})
        return status, (json.loads(out)["seatbid"][0]["bid"][0] if status == 200 else {})

    def get(self, url: str, via: str | None = None, **macros: str) -> tuple[int, dict]:
        for macro, value in macros.items():
            url = url.replace("${" + macro + "}", value)
        parts = urlsplit(url)
        status, headers, _ = request(via or self.url, "GET", f"{parts.path}?{parts.query}")
        return status, headers


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("money"), "--budget-period-s", str(PERIOD_S))
    yield n
    n.proc.stop()


def _notice_count(node: Node, kind: str, outcome: str) -> float:
    return scrape(node.admin_url).get(f'tafe_notices_total{{kind="{kind}",outcome="{outcome}"}}', 0.0)


def _until(check, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def test_billing_retries_count_once_whichever_worker_gets_them(node):
    status, bid = node.bid(160, 600)
    assert status == 200 and bid["cid"] == "c-bill"
    before = node.campaigns()["c-bill"]["spent"]
    assert node.get(bid["nurl"], AUCTION_PRICE="1.2345", AUCTION_CURRENCY="USD")[0] == 204
    # Three retries: through Nginx, and straight at the workers' shared listener on fresh connections.
    for via in (node.url, node.worker_url, node.worker_url):
        assert node.get(bid["burl"], via=via, AUCTION_PRICE="1.2345", AUCTION_CURRENCY="USD")[0] == 204
    after = node.campaigns()["c-bill"]
    assert round((after["spent"] - before) * 1e9) == 1_234_500  # 1.2345 CPM: 1,234,500 nanos, exactly once
    assert _until(lambda: _notice_count(node, "bill", "duplicate") >= 2)
    assert _until(lambda: _notice_count(node, "bill", "accepted") >= 1)  # each worker folds its counts within a second


def test_forged_tampered_expired_and_overpriced_notices_change_nothing(node):
    status, bid = node.bid(160, 600)
    assert status == 200
    spent = node.campaigns()["c-bill"]["spent"]
    token = bid["burl"].split("t=")[1].split("&")[0]
    tampered = bid["burl"].replace(token, token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB"))
    assert node.get(tampered, AUCTION_PRICE="1.0")[0] == 403
    # A billing notice for a bid never made, at 999 CPM: signed with another key, and with ours but old.
    never = NoticeFields("r-never", "1", "b-never", "c-bill", "c-bill-160x600", "", 999_000_000, int(time.time()))
    forged = sign(never, Keys.parse("k1:some-other-secret-0123456789"))
    assert request(node.url, path=f"/notice/bill?t={forged}&p=999")[0] == 403
    old = NoticeFields("r-old", "1", "b-old", "c-bill", "c-bill-160x600", "", 3_000_000, int(time.time()) - 7200)
    assert request(node.url, path=f"/notice/bill?t={sign(old, Keys.parse(KEYS))}&p=1.0")[0] == 410
    assert request(node.url, path="/notice/bill?r=x&i=1&b=y&p=999999")[0] == 403  # unsigned
    assert node.get(bid["burl"], AUCTION_PRICE="999")[0] == 400  # above our own bid price
    assert node.get(bid["burl"], AUCTION_PRICE="${AUCTION_PRICE}")[0] == 400  # macro never filled in
    assert node.campaigns()["c-bill"]["spent"] == spent
    # Each worker folds its counts into /metrics once a second: wait for both.
    wanted = {"bad_token": 2, "expired": 1, "unsigned": 1, "bad_price": 2}

    def counted() -> dict[str, float]:
        m = scrape(node.admin_url)
        return {o: m.get(f'tafe_notices_total{{kind="bill",outcome="{o}"}}', 0.0) for o in wanted}

    def all_counted() -> bool:
        got = counted()
        return all(got[o] >= n for o, n in wanted.items())

    assert _until(all_counted, timeout=10), counted()


def test_click_goes_only_to_the_declared_landing_url(node):
    status, bid = node.bid(160, 600)
    click = bid["adm"].split('href="')[1].split('"')[0]
    assert "/track/click?t=" in click
    status, headers = node.get(click)
    assert (status, headers["location"]) == (302, "https://c-bill.example/landing?src=tafe")
    forged = click[: click.index("t=") + 2] + "k1.eyJ4IjoxfQ.AAAAAAAAAAAAAAAAAAAAAA&to=https://evil.example"
    status, headers = node.get(forged)
    assert status == 403 and "location" not in headers


def test_frequency_cap_stops_the_fourth_impression_across_workers(node):
    shown = 0
    for i in range(6):
        # Alternate Nginx and the workers' listener, fresh connections: both workers serve.
        via = node.url if i % 2 else node.worker_url
        status, bid = node.bid(320, 50, user="capped-user", url=via)
        if status == 204:
            continue
        shown += 1
        assert node.get(bid["nurl"], via=via, AUCTION_PRICE="0.5", AUCTION_CURRENCY="USD")[0] == 204
        pixel = bid["adm"].split('<img src="')[-1].split('"')[0]
        assert node.get(pixel, via=node.worker_url)[0] == 200
    assert shown == 3
    assert node.bid(320, 50, user="another-user")[0] == 200  # the cap is per user
    assert _until(lambda: scrape(node.admin_url).get('tafe_no_bids_total{reason="frequency_cap"}', 0) >= 3)


@pytest.mark.slow
def test_simulated_exchange_asap_stops_at_budget_and_even_follows_its_line(node):
    # Start at a period boundary, so the even campaign's whole period is observed.
    time.sleep(PERIOD_S - time.time() % PERIOD_S + 0.2)
    start = time.time()
    period_end = (start // PERIOD_S + 1) * PERIOD_S
    sim = Exchange(
        node.url, imps=[{"banner": {"w": 300, "h": 250}}, {"banner": {"w": 728, "h": 90}}], users=400, bill_retries=1,
    )  # fmt: skip
    ledger = sim.run(period_end - time.time() - 0.5, threads=6)
    assert not [e for e in ledger.errors if not e.startswith("4")], ledger.errors[:5]
    in_period = [(t, c, n) for t, c, n in ledger.billed_at if start - 0.2 <= t < period_end]

    asap_budget, top_price = 400_000_000, 3_000_000  # nanos: 0.4 USD; one impression at 3.00 CPM at most
    asap = sum(n for _, c, n in in_period if c == "c-asap")
    assert 0.9 * asap_budget <= asap <= asap_budget * 1.01 + top_price, asap

    even_budget = 300_000_000
    for quarter in (1, 2, 3, 4):
        at = start - 0.2 + PERIOD_S * quarter / 4
        spent = sum(n for t, c, n in in_period if c == "c-even" and t < at)
        target = even_budget * quarter / 4
        assert abs(spent - target) <= 0.2 * target, (quarter, spent, target)


@pytest.mark.slow
def test_kill_9_of_a_worker_loses_no_committed_spend(tmp_path):
    node = Node(tmp_path, "--budget-period-s", "100000000")  # no period ends during the test
    try:
        sim = Exchange(node.url, imps=[{"banner": {"w": 160, "h": 600}}, {"banner": {"w": 300, "h": 250}}], users=100, bill_retries=1)
        stop = threading.Event()
        runner = threading.Thread(target=sim.run, args=(12.0,), kwargs={"threads": 4, "stop": stop})
        runner.start()
        time.sleep(4)
        victim = node.workers()[0]
        os.kill(victim, signal.SIGKILL)
        runner.join(60)
        time.sleep(1.5)  # the replacement worker is up, every worker has synced
        spent = {cid: round(c.get("spent", 0) * 1e9) for cid, c in node.campaigns().items() if "spent" in c}
        billed = sim.ledger.billed
        assert billed.get("c-bill", 0) > 0 and not alive(victim)
        for cid in ("c-bill", "c-asap"):
            assert spent[cid] == billed.get(cid, 0), (cid, spent[cid], billed.get(cid, 0))
    finally:
        node.proc.stop()
