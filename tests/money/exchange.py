"""A small simulated exchange for the money-loop tests: plain OpenRTB 2.6 over real HTTP.

Users view pages one after another (a user's next request waits for the notices of the
last one). Each bid meets one competing bid; the highest wins, at the second price
(at least the floor), as in a second-price auction. The winner's ``nurl`` is called with
the clearing price, then its impression pixel (the ``/track/imp`` URL in its markup),
sometimes its click URL (with ``click_rate``, or what ``click_rule(user, imp)`` says: a
hidden rule for the CQS loop to learn), and its ``burl`` (retried ``bill_retries`` more times, as
exchanges retry billing); a loser gets its ``lurl`` with loss code 102 and the price it
had to beat. What the exchange billed is summed from the billing notices TAFE answered
2xx: the exchange's own ledger, to compare with the budgets. Given several node URLs (a
fleet), each bid request and each notice goes to a node picked at random, so a bid's
notices and retries mostly reach other nodes than the one that bid.

With ``auction=1`` the auctions are first price instead: the winner pays its own bid,
and ``min_to_win`` says whether the exchange fills ``${AUCTION_MIN_TO_WIN}`` in (on win
and loss notices) or leaves it empty. ``competition(imp)`` gives each imp its own
competitor (median, sigma) instead of ``competitor_cpm``.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import urlsplit

_IMP_URL = re.compile(r'(https?://[^"\'<>\s]+/track/imp\?t=[A-Za-z0-9._-]+)')
_CLICK_URL = re.compile(r'(https?://[^"\'<>\s]+/track/click\?t=[A-Za-z0-9._-]+)')


@dataclass
class Ledger:
    """What the exchange saw, per campaign: bids, wins, billed (micros of CPM = nanos)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    bids: dict[str, int] = field(default_factory=dict)
    wins: dict[str, int] = field(default_factory=dict)
    billed: dict[str, int] = field(default_factory=dict)  # nanos, once per bid
    billed_at: list[tuple[float, str, int]] = field(default_factory=list)  # (time, campaign, nanos)
    impressions: dict[tuple[str, str], int] = field(default_factory=dict)  # (user, campaign) -> count
    clicks: dict[str, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)  # bid responses by their ext.cqs model version
    shadings: dict[str, int] = field(default_factory=dict)  # ... and by their ext.cqs shading version ("" for none)
    errors: list[str] = field(default_factory=list)

    def add(self, table: dict, key: object, n: int = 1) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + n


class Exchange:
    def __init__(
        self,
        url: str | list[str],
        *,
        imps: list[dict],
        users: int = 200,
        competitor_cpm: tuple[float, float] = (1.0, 0.4),  # lognormal median and sigma
        bill_retries: int = 2,
        click_rate: float = 0.05,
        click_rule: Callable[[str, dict], float] | None = None,
        seed: int = 1,
        auction: int = 2,
        min_to_win: bool = True,
        competition: Callable[[dict], tuple[float, float]] | None = None,
    ) -> None:
        self.nodes = [(p.hostname, p.port) for p in map(urlsplit, [url] if isinstance(url, str) else url)]
        self.imps = imps
        self.users = [f"user-{i}" for i in range(users)]
        self.competitor = competitor_cpm
        self.bill_retries = bill_retries
        self.click_rate = click_rate
        self.click_rule = click_rule
        self.seed = seed
        self.auction = auction
        self.min_to_win = min_to_win
        self.competition = competition
        self.ledger = Ledger()
        self._n = 0

    # --- HTTP ------------------------------------------------------------------------

    def _call(
        self, conn: list, method: str, target: str, body: bytes | None = None, retries: int = 5, node: int = 0
    ) -> tuple[int, dict, bytes]:
        """One request to ``node`` on a kept-alive connection, reconnecting (and retrying) after a failure."""
        last = ""
        for _ in range(retries):
            if conn[node] is None:
                conn[node] = http.client.HTTPConnection(*self.nodes[node], timeout=10)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                conn[node].request(method, target, body=body, headers=headers)
                resp = conn[node].getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    conn[node].close()
                    conn[node] = None
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (OSError, http.client.HTTPException) as exc:
                last = repr(exc)
                conn[node].close()
                conn[node] = None
                time.sleep(0.05)
        raise ConnectionError(last)

    def _pick(self, rng: random.Random) -> int:
        return rng.randrange(len(self.nodes)) if len(self.nodes) > 1 else 0  # one node: the same draws as before

    @staticmethod
    def _path(url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.path}?{parts.query}"

    # --- one page view -------------------------------------------------------------------

    def view(self, conn: list, rng: random.Random, user: str) -> None:
        self._n += 1
        imp = dict(rng.choice(self.imps))
        request = {
            "id": f"r{self._n}-{rng.getrandbits(32):x}", "imp": [{**imp, "id": "1"}], "at": self.auction, "tmax": 200,
            "site": {"domain": "news.example", "page": "https://news.example/a"},
            "device": {"ua": "Mozilla/5.0", "ip": "192.0.2.1", "devicetype": 2, "geo": {"country": "USA"}},
            "user": {"id": user, "buyeruid": user}, "cur": ["USD"],
        }  # fmt: skip
        node = self._pick(rng)
        status, _, body = self._call(conn, "POST", "/openrtb2/bid", json.dumps(request).encode(), node=node)
        if status == 204:
            return
        if status != 200:
            self.ledger.errors.append(f"bid answered {status}")
            return
        answer = json.loads(body)
        bid = answer["seatbid"][0]["bid"][0]
        self.ledger.add(self.ledger.models, answer.get("ext", {}).get("cqs", {}).get("model", ""))
        self.ledger.add(self.ledger.shadings, answer.get("ext", {}).get("cqs", {}).get("shading", ""))
        campaign = bid["cid"]
        ours = Decimal(str(bid["price"]))
        self.ledger.add(self.ledger.bids, campaign)
        median, sigma = self.competition(imp) if self.competition is not None else self.competitor
        theirs = Decimal(str(round(rng.lognormvariate(0, sigma) * median, 4)))
        floor = Decimal(str(imp.get("bidfloor", 0)))
        mtw = str(max(theirs, floor)) if self.min_to_win else ""
        if theirs >= ours:
            self._notice(conn, rng, bid["lurl"], {"${AUCTION_LOSS}": "102", "${AUCTION_MIN_TO_WIN}": mtw})
            return
        clearing = ours if self.auction == 1 else max(theirs, floor)
        self.ledger.add(self.ledger.wins, campaign)
        macros = {"${AUCTION_PRICE}": str(clearing), "${AUCTION_CURRENCY}": "USD"}
        self._notice(conn, rng, bid["nurl"], {**macros, "${AUCTION_MIN_TO_WIN}": mtw})
        if m := _IMP_URL.search(bid.get("adm", "")):
            self._notice(conn, rng, m.group(1), {})
            self.ledger.add(self.ledger.impressions, (user, campaign))
        click_rate = self.click_rule(user, imp) if self.click_rule is not None else self.click_rate
        if rng.random() < click_rate and (m := _CLICK_URL.search(bid.get("adm", ""))):
            self._notice(conn, rng, m.group(1), {})
            self.ledger.add(self.ledger.clicks, campaign)
        billed = False
        for _ in range(1 + self.bill_retries):
            if 200 <= self._notice(conn, rng, bid["burl"], macros) < 300:
                billed = True
        if billed:
            nanos = int(clearing * 1_000_000)
            self.ledger.add(self.ledger.billed, campaign, nanos)
            with self.ledger.lock:
                self.ledger.billed_at.append((time.time(), campaign, nanos))

    def _notice(self, conn: list, rng: random.Random, url: str, macros: dict[str, str]) -> int:
        for macro, value in macros.items():
            url = url.replace(macro, value)
        status = self._call(conn, "GET", self._path(url), node=self._pick(rng))[0]
        if status >= 400:
            self.ledger.errors.append(f"{status} for {urlsplit(url).path}")
        return status

    # --- a run -----------------------------------------------------------------------------

    def run(self, seconds: float, threads: int = 8, stop: threading.Event | None = None, views: int = 0) -> Ledger:
        """``threads`` clients, each walking its share of the users, until ``seconds`` pass
        (or, with ``views``, each client has made that many page views)."""
        stop = stop or threading.Event()
        end = time.monotonic() + seconds

        def client(i: int) -> None:
            rng = random.Random(self.seed * 1000 + i)
            conn: list = [None] * len(self.nodes)
            mine = self.users[i::threads]
            n = 0
            try:
                while time.monotonic() < end and not stop.is_set() and (not views or n < views):
                    self.view(conn, rng, rng.choice(mine))
                    n += 1
            except Exception as exc:  # recorded: the test decides whether it matters
                self.ledger.errors.append(repr(exc))
            finally:
                for c in conn:
                    if c is not None:
                        c.close()

        workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(seconds + 60)
        return self.ledger
