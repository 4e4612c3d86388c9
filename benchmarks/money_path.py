"""What the money loop costs the bid path: budgets, pacing and caps on against off, one run.

Two copies of the same public WSGI app (``tafe.handlers.make_public_app``) over the same
campaigns, one with every campaign budgeted (half even, half asap), frequency-capped and
landing-paged, one with none of that: the same bid requests (known users, so the cap
lookup runs; each bid signs its notice token either way), called in interleaved rounds
in this one process. The "on" app syncs its floats with the real LMDB state every 1,000
requests, as a worker does once a second at a few thousand requests/s, and that cost is
counted. CPU time (``time.process_time``), best of the rounds for each, then the ratio.

CPU time on this shared 2-core machine strays by 10% from round to round, as much as the
goal allows; so each app also runs in a child process under valgrind (cachegrind), which
counts the instructions per bid request to a fraction of a percent (but not cache misses
or system calls, which CPU time sees): ``--valgrind-runs`` (0 skips it, ~1 min a run).

    .venv/bin/python benchmarks/money_path.py [--rounds 7] [--valgrind-runs 3] [--record]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
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
from tafe.events import NullSink  # noqa: E402
from tafe.handlers import Money, make_public_app, open_money  # noqa: E402
from tafe.handlers.notices import NoticeQueue  # noqa: E402
from tafe.lifecycle import Lifecycle  # noqa: E402
from tafe.metrics import Metrics  # noqa: E402
from tafe.money import banker as banker_mod  # noqa: E402
from tafe.money import node_settings  # noqa: E402
from tafe.money.banker import Banker  # noqa: E402
from tafe.money.embedded import EmbeddedState  # noqa: E402
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


def _requests(tmax: int = 0) -> list[bytes]:
    body = json.loads((DATA_DIR / "demo-request.json").read_text())
    if tmax:
        body["tmax"] = tmax
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
    if settings.state.startswith("redis://"):
        money_ = open_money(settings, camps)
    else:  # open_money's parts on a 1 GiB map: valgrind (--instructions) refuses the default 64 GiB of address space
        banker = Banker(camps.campaigns, worker="bench", period_s=settings.budget_period_s,
                        reservation_ttl_s=settings.reservation_ttl_s)  # fmt: skip
        money_ = Money(banker, EmbeddedState(settings.state, map_size=1 << 30), NullSink(), settings, NoticeQueue())
    money_.sync(metrics, time.time())
    app = make_public_app(settings, lifecycle=Lifecycle(), metrics=metrics, holder=Holder(open_snapshot(settings.model)),
                          campaigns=camps, money=money_)  # fmt: skip
    return app, money_, metrics


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


def _child(name: str, n: int) -> int:
    """Run under valgrind: warm up, then ``n`` bid requests to the ``name`` app; every one must bid.

    Valgrind runs ~30x slower: 1,000 requests then outlast a float's trust (4 s), and the floats
    go stale between syncs. Here they are trusted for an hour instead, so that the same checks
    run as natively, whatever the machine's load; and the requests allow the longest deadline
    (1 s, not 100 ms), lest a moment off the CPU make a request a no-bid."""
    banker_mod.FLOAT_TRUST_S = 3600.0
    scratch = tempfile.TemporaryDirectory(prefix="tafe-money-bench-")  # removed at exit
    tmp = Path(scratch.name)
    bodies = _requests(tmax=1000)
    app, state, metrics = _app(name == "on", tmp)
    _run(app, state, metrics, bodies, 1000)
    metrics.updates.fold()
    before = metrics.registry.get_sample_value("tafe_bids_total", {"exchange": "default"}) or 0
    _run(app, state, metrics, bodies, n)
    metrics.updates.fold()
    bids = (metrics.registry.get_sample_value("tafe_bids_total", {"exchange": "default"}) or 0) - before
    if bids != n:
        no_bids = {s.labels["reason"]: s.value for m in metrics.no_bids.collect() for s in m.samples if s.value}
        print(f"{name}: {bids:.0f} bids for {n} requests (no-bids since start: {no_bids})", file=sys.stderr)
        return 1
    return 0


VALGRIND_REQUESTS = (1000, 3000)


def instructions_per_request(runs: int) -> dict[str, list[float]]:
    """User-space instructions per bid request of each app (cachegrind), ``runs`` times: a child
    process's whole life at two request counts, the difference divided by the requests between
    (start-up and warm-up cancel out). Stable to a fraction of a percent where CPU time on this
    shared machine strays by 10%; blind to cache misses and system calls, which CPU time sees."""
    from concurrent.futures import ThreadPoolExecutor

    low, high = VALGRIND_REQUESTS
    out: dict[str, list[float]] = {"off": [], "on": []}
    with ThreadPoolExecutor(2) as pool:
        for _ in range(runs):
            counts = {(m, n): pool.submit(_instructions, m, n) for m in out for n in VALGRIND_REQUESTS}
            for m in out:
                out[m].append((counts[m, high].result() - counts[m, low].result()) / (high - low))
    return out


def _instructions(name: str, n: int) -> int:
    """Instructions of a child process (``--child``) under cachegrind over its whole life."""
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
           sys.executable, __file__, "--child", name, "--requests", str(n)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, timeout=900)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return int(next(line for line in out.stderr.splitlines() if "I   refs" in line).split(":")[1].replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=5000, help="bid requests per app per round")
    parser.add_argument("--record", action="store_true", help="rewrite the section in benchmarks/RESULTS.md")
    parser.add_argument("--valgrind-runs", type=int, default=3, help="instruction counts under cachegrind (0: skip)")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.requests)
    scratch = tempfile.TemporaryDirectory(prefix="tafe-money-bench-")  # removed at exit
    tmp = Path(scratch.name)
    bodies = _requests()
    apps = {"off": _app(False, tmp), "on": _app(True, tmp)}
    for app, state, metrics in apps.values():  # warm up: caches, first sync
        _run(app, state, metrics, bodies, 500)
    results: dict[str, list[float]] = {"off": [], "on": []}
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for name, (app, state, metrics) in apps.items():
            results[name].append(_run(app, state, metrics, bodies, args.requests)[0])
    for _, _, metrics in apps.values():
        metrics.updates.fold()  # counts are folded into the metrics once a second: fold the last ones
    bids = {name: metrics.registry.get_sample_value("tafe_bids_total", {"exchange": "default"}) for name, (_, _, metrics) in apps.items()}
    off, on = min(results["off"]), min(results["on"])
    info = machine_info()
    if args.valgrind_runs:
        info["valgrind"] = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    ratios = [b / a for a, b in zip(results["off"], results["on"])]
    paired = statistics.median(ratios)
    rows = [
        ("budgets, pacing, caps off", f"{off:.1f}", " ".join(f"{v:.1f}" for v in results["off"]), "1.00x"),
        ("budgets, pacing, caps on", f"{on:.1f}", " ".join(f"{v:.1f}" for v in results["on"]), f"{on / off:.3f}x"),
    ]
    lines = [
        "## Money loop: bid-path cost with budgets, pacing and frequency caps",
        "",
        f"    .venv/bin/python benchmarks/money_path.py --rounds {args.rounds} --valgrind-runs {args.valgrind_runs} --record",
        "",
        format_machine(info),
        "",
        "**CPU time** (``time.process_time``, interleaved rounds of %d requests per app):" % args.requests,
        "",
        table(["app", "CPU us per bid request (best)", "per round", "vs off"], rows),
        "",
        f"Bids made (the budgeted app passes some requests by when an even-paced float runs short between syncs): off {bids['off']:.0f}, on {bids['on']:.0f}. "
        f"Per round, on against the off round just before it: median {paired:.3f}x (rounds {' '.join(f'{r:.2f}' for r in ratios)});"
        f" this follows the machine's load as it changes, where the best of each app may come from different moments."
        f" Load average before the CPU rounds: {' '.join(f'{x:.2f}' for x in load_before)}.",
    ]  # fmt: skip
    verdicts = [
        f"CPU best of each {on / off:.3f}x: **{'met' if on / off <= GOAL else 'not met'}**",
        f"CPU per round (median) {paired:.3f}x: **{'met' if paired <= GOAL else 'not met'}**",
    ]
    if args.valgrind_runs:
        counts = instructions_per_request(args.valgrind_runs)
        i_off, i_on = statistics.median(counts["off"]), statistics.median(counts["on"])
        low, high = VALGRIND_REQUESTS
        lines += [
            "",
            f"**Instructions** (user space, cachegrind; each app's process at {low:,} and {high:,} requests after 1,000"
            f" warm-up ones, the difference per request; {args.valgrind_runs} runs, medians; floats trusted for the run"
            " and a 1 s tmax, so that valgrind's slowness changes no decision):",
            "",
            table(
                ["app", "instructions per bid request (median)", "per run", "vs off"],
                [("budgets, pacing, caps off", f"{i_off:,.0f}", " ".join(f"{v:,.0f}" for v in counts["off"]), "1.00x"),
                 ("budgets, pacing, caps on", f"{i_on:,.0f}", " ".join(f"{v:,.0f}" for v in counts["on"]), f"{i_on / i_off:.3f}x")],
            ),  # fmt: skip
        ]
        verdicts.append(f"instructions {i_on / i_off:.3f}x: **{'met' if i_on / i_off <= GOAL else 'not met'}**")
    lines += ["", f"Goal: at most {GOAL:.2f}x. " + "; ".join(verdicts) + "."]
    text = "\n".join(lines)
    print(text)
    if args.record:
        record("money-path", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
