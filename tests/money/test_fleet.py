"""A fleet: two ``tafe serve --workers 2`` nodes sharing one real redis-server (``--state redis://...``).

Bids and notices are spread over the nodes by the simulated exchange, so a bid's notices
and retries mostly reach the other node; Redis is killed (by pid) mid-run and restarted on
the same port with its append-only file.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_master import Proc, request, scrape

from .exchange import Exchange
from .redis_server import RedisServer
from .test_money_node import CAMPAIGNS, KEYS

NODE_RE = r"tafe.master.* listening on (http://[\d.]+:\d+) \(admin (http://[\d.]+:\d+)\) with 2 workers"
TOP_PRICE = 3_000_000  # nanos: one impression at the campaigns' 3.00 CPM max


class FleetNode:
    def __init__(self, tmp: Path, state: str, period_s: int = 100_000_000) -> None:
        path = tmp / "campaigns.json"
        path.write_text(json.dumps(CAMPAIGNS))
        self.proc = Proc(
            "serve", "--workers", "2", "--port", "0", "--admin-port", "0", "--drain-grace-s", "0.5",
            "--campaigns", str(path), "--state", state, "--reservation-ttl-s", "30", "--budget-period-s", str(period_s),
            env={"TAFE_NOTICE_KEYS": KEYS},
        )  # fmt: skip
        m = self.proc.wait_for(NODE_RE, timeout=60)
        self.url, self.admin_url = m.group(1), m.group(2)

    def campaigns(self) -> dict[str, dict]:
        status, _, body = request(self.admin_url, path="/debug/campaigns")
        assert status == 200, body
        return {c["id"]: c for c in json.loads(body)["campaigns"]}

    def bid(self, w: int, h: int, user: str) -> tuple[int, dict]:
        body = {
            "id": f"r-{time.monotonic_ns()}", "imp": [{"id": "1", "banner": {"w": w, "h": h}}],
            "site": {"domain": "news.example"}, "user": {"id": user}, "device": {"ip": "192.0.2.1"},
        }  # fmt: skip
        status, _, out = request(
            self.url, "POST", "/openrtb2/bid", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        return status, (json.loads(out)["seatbid"][0]["bid"][0] if status == 200 else {})

    def get(self, url: str, **macros: str) -> int:
        for macro, value in macros.items():
            url = url.replace("${" + macro + "}", value)
        parts = urlsplit(url)
        return request(self.url, "GET", f"{parts.path}?{parts.query}")[0]


@pytest.fixture
def fleet(tmp_path, request):
    redis = RedisServer(tmp_path / "redis")
    nodes: list[FleetNode] = []
    period_s = getattr(request, "param", 100_000_000)
    try:
        for i in range(2):
            (tmp_path / f"n{i}").mkdir()
            nodes.append(FleetNode(tmp_path / f"n{i}", redis.url, period_s))
        yield redis, nodes
    finally:
        for n in nodes:
            n.proc.stop()
        redis.stop()


def _spent(node: FleetNode) -> dict[str, int]:
    return {cid: round(c["spent"] * 1e9) for cid, c in node.campaigns().items() if "spent" in c}


def test_a_bill_retried_to_every_node_counts_once_and_a_cap_holds_across_nodes(fleet):
    _, (a, b) = fleet
    status, bid = a.bid(160, 600, "u1")
    assert status == 200 and bid["cid"] == "c-bill"
    for node in (a, b, b, a):
        assert node.get(bid["burl"], AUCTION_PRICE="1.2345", AUCTION_CURRENCY="USD") == 204
    assert _spent(a)["c-bill"] == _spent(b)["c-bill"] == 1_234_500  # once, and both nodes read the same state
    shown = 0
    for i in range(6):
        node, other = (a, b) if i % 2 else (b, a)  # bid on one node, its notices on the other
        status, bid = node.bid(320, 50, "capped-user")
        if status == 204:
            continue
        shown += 1
        assert other.get(bid["nurl"], AUCTION_PRICE="0.5", AUCTION_CURRENCY="USD") == 204
    assert shown == 3
    assert a.bid(320, 50, "another-user")[0] == 200


def test_asap_budget_stops_within_one_percent_across_nodes(fleet):
    _, nodes = fleet
    budget, workers = 400_000_000, 2 * len(nodes)
    sim = Exchange([n.url for n in nodes], imps=[{"banner": {"w": 300, "h": 250}}], users=300, bill_retries=1)
    stop = threading.Event()
    runner = threading.Thread(target=sim.run, args=(40.0,), kwargs={"threads": 4, "stop": stop})
    runner.start()
    deadline = time.monotonic() + 40
    while nodes[0].campaigns()["c-asap"]["spent"] * 1e9 < budget - workers * TOP_PRICE and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)  # more traffic past the budget: none of it may be billed
    stop.set()
    runner.join(60)
    ledger = sim.ledger
    assert not [e for e in ledger.errors if not e.startswith("4")], ledger.errors[:5]
    billed = ledger.billed.get("c-asap", 0)
    # Stopped within 1% (plus one impression per node); what is left is at most a float under one bid per worker.
    assert budget - workers * TOP_PRICE <= billed <= budget * 1.01 + len(nodes) * TOP_PRICE, billed
    time.sleep(1.5)  # every worker has reported
    assert _spent(nodes[0])["c-asap"] == _spent(nodes[1])["c-asap"] == billed


EVEN_PERIOD_S = 16


@pytest.mark.parametrize("fleet", [EVEN_PERIOD_S], indirect=True)
def test_even_pacing_follows_its_line_for_the_fleet_as_a_whole(fleet):
    _, nodes = fleet
    time.sleep(EVEN_PERIOD_S - time.time() % EVEN_PERIOD_S + 0.2)  # a whole period, from its start
    start = time.time()
    period_end = (start // EVEN_PERIOD_S + 1) * EVEN_PERIOD_S
    sim = Exchange([n.url for n in nodes], imps=[{"banner": {"w": 728, "h": 90}}], users=300, bill_retries=1)
    ledger = sim.run(period_end - time.time() - 0.3, threads=4)
    assert not [e for e in ledger.errors if not e.startswith("4")], ledger.errors[:5]
    budget = 300_000_000
    for half in (1, 2):
        at = start - 0.2 + EVEN_PERIOD_S * half / 2
        spent = sum(n for t, c, n in ledger.billed_at if c == "c-even" and start - 0.2 <= t < at)
        assert abs(spent - budget * half / 2) <= 0.2 * budget * half / 2, (half, spent)


def test_redis_killed_mid_run_no_5xx_no_overspend_and_notices_applied_when_back(fleet):
    redis, nodes = fleet
    sim = Exchange(
        [n.url for n in nodes], imps=[{"banner": {"w": 160, "h": 600}}, {"banner": {"w": 300, "h": 250}}], users=200,
        bill_retries=1,
    )  # fmt: skip
    runner = threading.Thread(target=sim.run, args=(12.0,), kwargs={"threads": 4})
    runner.start()
    time.sleep(3)
    redis.stop()  # SIGKILL, by pid
    time.sleep(3)
    during = sum(sim.ledger.billed.values())
    redis.start()  # same port, same append-only file
    runner.join(60)
    ledger = sim.ledger
    assert not [e for e in ledger.errors if not e.startswith("4")], ledger.errors[:5]  # no 5xx, nothing hung
    assert during > 0
    deadline = time.monotonic() + 15
    while (spent := _spent(nodes[0])) != {k: ledger.billed.get(k, 0) for k in spent} and time.monotonic() < deadline:
        time.sleep(0.5)  # the kept notices are applied within a second or two of Redis's return
    assert ledger.billed.get("c-bill", 0) > 0
    for cid in ("c-bill", "c-asap"):
        assert spent[cid] == ledger.billed.get(cid, 0), (cid, spent[cid], ledger.billed.get(cid, 0))
    assert spent["c-asap"] <= 400_000_000 * 1.01 + len(nodes) * TOP_PRICE
    queued = sum(
        scrape(n.admin_url).get(f'tafe_notices_total{{kind="{k}",outcome="queued"}}', 0) for n in nodes for k in ("bill", "win")
    )
    errors = sum(v for n in nodes for k, v in scrape(n.admin_url).items() if k.startswith("tafe_money_state_errors_total"))
    assert queued > 0 and errors > 0  # /metrics says Redis was gone
    for n in nodes:  # the log says so once per worker and outage, not per request or retry
        said = [line for line in n.proc.lines if "money state" in line]
        assert len(said) <= 6 * 2, said


@pytest.mark.parametrize("state", ["redis://127.0.0.1:{port}/0", "redis:///0"])
def test_an_unreachable_or_malformed_redis_is_one_line_at_start(state):
    from .redis_server import free_port

    state = state.format(port=free_port())  # nothing listens there
    proc = Proc("serve", "--workers", "2", "--port", "0", "--admin-port", "-1", "--state", state, env={"TAFE_NOTICE_KEYS": KEYS})
    assert proc.proc.wait(30) != 0
    out = proc.output().strip()
    assert len(out.splitlines()) == 1 and f"state {state}" in out and "Traceback" not in out, out
