"""Exchange-like load on a running TAFE: ``locust -f benchmarks/locustfile.py --host URL``.

Each simulated exchange connection posts generated OpenRTB requests (``traffic.py``: the
format/inventory/user mix is set by ``TRAFFIC_*`` variables), judges every answer with
``traffic.validate`` (a wrong answer is a locust failure whose message is the reason) and
calls the win notice (``nurl`` with ``${AUCTION_PRICE}`` filled in) for a share of bids.

Beyond locust's own statistics it counts bids: workers report their counts to the master
(distributed mode), and on exit one summary line (rps, p50/p95/p99, failures, bid rate)
is printed and, with ``TRAFFIC_SUMMARY=path``, written as JSON.

Variables: ``TRAFFIC_PATH`` (default ``/openrtb2/bid/loadtest``), ``TRAFFIC_USER_RPS``
(requests/s per user; unset: back to back), ``TRAFFIC_SEED``, and the ``Mix`` fields.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, events, task
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import traffic  # noqa: E402  (stdlib only; shared with the benchmarks and the tests)

MIX = traffic.Mix.from_env()
BID_PATH = os.environ.get("TRAFFIC_PATH", "/openrtb2/bid/loadtest")
USER_RPS = float(os.environ.get("TRAFFIC_USER_RPS") or 0)
SEED = os.environ.get("TRAFFIC_SEED")
_user_serial = itertools.count()

# answers (valid ones), bids, answers with at least one bid, 204s, nbr-200s, win notices sent
COUNTS: Counter[str] = Counter()


class Exchange(FastHttpUser):
    """One exchange connection: a keep-alive HTTP client sending bid requests."""

    wait_time = constant_throughput(USER_RPS) if USER_RPS > 0 else constant(0)
    connection_timeout = 5.0
    network_timeout = 5.0

    def on_start(self) -> None:
        seed = None if SEED is None else int(SEED) * 100_003 + next(_user_serial)
        self.gen = traffic.Generator(MIX, seed=seed)
        self.rng = random.Random(seed)

    @task
    def bid(self) -> None:
        req = self.gen.request()
        body, headers = self.gen.encode(req)
        with self.client.post(BID_PATH, data=body, headers=headers, name="bid", catch_response=True) as resp:
            outcome = traffic.validate(req, resp.status_code, resp.content or b"")
            if not outcome.ok:
                resp.failure(outcome.reason + _error(resp))
                return
            resp.success()
        COUNTS["answers"] += 1
        if outcome.bids:
            COUNTS["answers_with_bid"] += 1
            COUNTS["bids"] += len(outcome.bids)
        elif outcome.nbr is not None:
            COUNTS["nbr"] += 1
        else:
            COUNTS["no_bid_204"] += 1
        for bid in outcome.bids:
            if bid.get("nurl") and self.rng.random() < MIX.win_notice:
                self._win(bid, req)

    def _win(self, bid: dict, req: dict) -> None:
        url = traffic.win_url(bid, req)
        with self.client.get(url, name="win notice", catch_response=True) as resp:
            if resp.status_code in (200, 204):
                resp.success()
                COUNTS["wins"] += 1
            else:
                resp.failure(f"win notice answered HTTP {resp.status_code}{_error(resp)}")


def _error(resp) -> str:
    """The client-side error (connection refused, timeout...) behind a status 0, if any."""
    return f" ({type(resp.error).__name__}: {resp.error})" if resp.status_code == 0 and resp.error else ""


@events.report_to_master.add_listener
def _report(client_id: str, data: dict) -> None:
    data["tafe_counts"] = dict(COUNTS)
    COUNTS.clear()


@events.worker_report.add_listener
def _collect(client_id: str, data: dict) -> None:
    COUNTS.update(data.get("tafe_counts", {}))


def summary(environment) -> dict:
    """The figures a load test is judged by, from locust's totals and the bid counts."""
    total = environment.stats.total
    bid = environment.stats.get("bid", "POST")
    answers = COUNTS["answers"]
    return {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "rps": round(total.total_rps, 1),
        "bid_p50_ms": bid.get_response_time_percentile(0.50),
        "bid_p95_ms": bid.get_response_time_percentile(0.95),
        "bid_p99_ms": bid.get_response_time_percentile(0.99),
        "bid_requests": bid.num_requests,
        "bid_rate": round(COUNTS["answers_with_bid"] / answers, 4) if answers else 0.0,
        "bids": COUNTS["bids"],
        "no_bid_204": COUNTS["no_bid_204"],
        "no_bid_nbr": COUNTS["nbr"],
        "win_notices": COUNTS["wins"],
        "failure_reasons": {f"{e.name}: {e.error}": e.occurrences for e in environment.stats.errors.values()},
    }


@events.quitting.add_listener
def _summarize(environment, **kwargs) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    s = summary(environment)
    line = (
        f"TAFE load test: {s['requests']} requests, {s['rps']} req/s, bid p50/p95/p99 "
        f"{s['bid_p50_ms']}/{s['bid_p95_ms']}/{s['bid_p99_ms']} ms, {s['failures']} failures, "
        f"bid rate {s['bid_rate']:.1%} ({s['bids']} bids, {s['no_bid_204']} 204s, {s['win_notices']} win notices)"
    )
    print(line, file=sys.stderr, flush=True)
    for reason, n in sorted(s["failure_reasons"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"  failure x{n}: {reason}", file=sys.stderr)
    path = os.environ.get("TRAFFIC_SUMMARY")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**s, "summary": line, "distributed": isinstance(environment.runner, MasterRunner)}, indent=2) + "\n")
