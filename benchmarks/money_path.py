"""What the money loop costs the bid path: budgets, pacing and caps on against off, one run.

Two copies of the same public WSGI app (``tafe.handlers.make_public_app``) over the same
campaigns, one with every campaign budgeted (half even, half asap), frequency-capped and
landing-paged, one with none of that: the same bid requests (known users, so the cap
lookup runs; each bid signs its notice token either way), called in interleaved rounds
in this one process. The "on" app syncs its floats with the real LMDB state every 1,000
requests, as a worker does once a second at a few thousand requests/s, and that cost is
counted. CPU time (``time.process_time``), best of the rounds for each, then the ratio.

    .venv/bin/python benchmarks/money_path.py [--rounds 7] [--record]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_machine, machine_info, record, table  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from tafe.core import campaigns as campaigns_mod  # noqa: E402
from tafe.cqs import open_snapshot  # noqa: E402
from tafe.cqs.swap import Holder  # noqa: E402
from tafe.handlers import make_public_app, open_money  # noqa: E402
from tafe.lifecycle import Lifecycle  # noqa: E402
from tafe.metrics import Metrics  # noqa: E402
from tafe.money import node_settings  # noqa: E402
from tafe.settings import DATA_DIR, Settings  # noqa: E402

GOAL = 1.10


def _campaigns(money: bool, tmp: Path) -> str:
    doc = json.loads((DATA_DIR / "campaigns.json").read_text())
    for i, c in enumerate(doc["campaigns"]):
        for key in ("daily_budget", "pacing", "frequency_cap"):
            c.pop(key, None)
        if money:
            # Budgets far above what the run spends: every bid passes the checks (the cost
            # measured is the checks', not fewer bids).
            c.update(daily_budget=10_000_000, pacing="even" if i % 2 else "asap",
                     frequency_cap={"impressions": 1000, "window_s": 86400})  # fmt: skip
    path = tmp / ("money.json" if money else "plain.json")
    path.write_text(json.dumps(doc))
    return str(path)


def _requests() -> list[bytes]:
    body = json.loads((DATA_DIR / "demo-request.json").read_text())
    out = []
    for i in range(200):
        body["id"] = f"req-{i}"
        body.setdefault("user", {})["id"] = f"user-{i % 50}"
        out.append(json.dumps(body).encode())
    return out


def _app(money: bool, tmp: Path, state: str = ""):
    """The public app over the campaigns with (``money``) or without budgets and caps, on ``state``
    (an LMDB directory under ``tmp`` by default, or a ``redis://`` URL)."""
    state = state or str(tmp / ("state-on" if money else "state-off"))
    settings = node_settings(Settings(campaigns=_campaigns(money, tmp), notice_base_url="https://bid.test", state=state))
    camps = campaigns_mod.load(settings.campaigns)
    metrics = Metrics(CollectorRegistry(), deferred=True)
    state = open_money(settings, camps)
    state.sync(metrics, time.time())
    app = make_public_app(settings, lifecycle=Lifecycle(), metrics=metrics, holder=Holder(open_snapshot(settings.model)),
                          campaigns=camps, money=state)  # fmt: skip
    return app, state, metrics


def _run(app, state, metrics, bodies: list[bytes], n: int) -> tuple[float, float]:
    """(CPU us, wall us) per bid request, syncing the floats every 1,000 requests as a worker does every second."""

    def start_response(status, headers, exc_info=None):
        return None

    t0, w0 = time.process_time(), time.perf_counter()
    for i in range(n):
        body = bodies[i % len(bodies)]
        app({"REQUEST_METHOD": "POST", "PATH_INFO": "/openrtb2/bid", "CONTENT_LENGTH": str(len(body)),
             "wsgi.input": io.BytesIO(body), "HTTP_HOST": "bid.test"}, start_response)  # fmt: skip
        if i % 1000 == 999:
            state.sync(metrics, time.time())
    return (time.process_time() - t0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=5000, help="bid requests per app per round")
    parser.add_argument("--record", action="store_true", help="rewrite the section in benchmarks/RESULTS.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tafe-money-bench-"))
    bodies = _requests()
    apps = {"off": _app(False, tmp), "on": _app(True, tmp)}
    for app, state, metrics in apps.values():  # warm up: caches, first sync
        _run(app, state, metrics, bodies, 500)
    results: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.rounds):
        for name, (app, state, metrics) in apps.items():
            results[name].append(_run(app, state, metrics, bodies, args.requests)[0])
    for _, _, metrics in apps.values():
        metrics.updates.fold()  # counts are folded into the metrics once a second: fold the last ones
    bids = {name: metrics.registry.get_sample_value("tafe_bids_total", {"exchange": "default"}) for name, (_, _, metrics) in apps.items()}
    off, on = min(results["off"]), min(results["on"])
    rows = [
        ("budgets, pacing, caps off", f"{off:.1f}", " ".join(f"{v:.1f}" for v in results["off"]), "1.00x"),
        ("budgets, pacing, caps on", f"{on:.1f}", " ".join(f"{v:.1f}" for v in results["on"]), f"{on / off:.2f}x"),
    ]
    text = "\n".join([
        "## Money loop: bid-path cost with budgets, pacing and frequency caps",
        "",
        "    .venv/bin/python benchmarks/money_path.py --rounds %d --record" % args.rounds,
        "",
        format_machine(machine_info()),
        "",
        table(["app", "CPU us per bid request (best)", "per round", "vs off"], rows),
        "",
        f"Bids made (the budgeted app passes some requests by when an even-paced float runs short between syncs): off {bids['off']:.0f}, on {bids['on']:.0f}. "
        f"Goal: at most {GOAL:.2f}x: **{'met' if on / off <= GOAL else 'not met'}** ({on / off:.2f}x).",
    ])  # fmt: skip
    print(text)
    if args.record:
        record("money-path", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
