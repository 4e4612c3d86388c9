"""Catch rate: gevent's monitor thread vs the greenlet profiler, on the same blocks.

    python benchmarks/profiler_catch_rate.py [--blocks 40] [--record]

A child process runs gevent's monitor thread (``GEVENT_MONITOR_THREAD_ENABLE=1``) and the
profiler (threshold 10 ms, chained to gevent's tracer) side by side, and fires
``--blocks`` blocks of each kind (an unpatched ``time.sleep`` and a pure-Python CPU loop)
and length (20 and 50 ms), in random order, each in its own greenlet served like a
request through the profiler's WSGI middleware, separated by random cooperative pauses
(10-150 ms). Run once with gevent's default ``max_blocking_time`` (0.1 s) and once with
it tuned to the profiler's 10 ms.

A block counts as *caught* by gevent's monitor when one of its reports is emitted during
the block, and by the profiler when an event names that block's request; *on the line*
when the stack taken while blocked names the line that blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

SECTION = "profiler-catch-rate"
KINDS = ("sleep", "cpu")
LENGTHS_MS = (20, 50)


def child(blocks: int, seed: int) -> dict:
    """Runs in the child process (gevent's monitor configured by the environment)."""
    from gevent import monkey

    monkey.patch_all()
    import random
    import time

    import gevent
    import gevent.events
    from gevent.monkey import get_original

    from tafe import profiler

    blocking_sleep = get_original("time", "sleep")
    clock = time.perf_counter
    reports: list[tuple[float, int, str]] = []  # (time, lines, text)

    def on_event(event: object) -> None:  # runs in gevent's monitor thread
        if isinstance(event, gevent.events.EventLoopBlocked):
            text = "\n".join(event.info)
            reports.append((clock(), len(text.splitlines()), text))

    gevent.events.subscribers.append(on_event)
    hub = gevent.get_hub()
    gevent.sleep(0.2)  # the hub starts gevent's monitor thread when the loop first runs
    assert hub.periodic_monitoring_thread is not None, "gevent's monitor thread is not running"
    prof = profiler.install(threshold_ms=10, log=False)
    events: list[profiler.BlockEvent] = []
    prof.listeners.append(events.append)

    def sleep_block(seconds: float) -> None:
        blocking_sleep(seconds)  # CULPRIT sleep

    def cpu_block(seconds: float) -> None:
        end = clock() + seconds
        while clock() < end: pass  # CULPRIT cpu  # noqa: E701

    culprit_lines = {
        kind: next(i for i, line in enumerate(Path(__file__).read_text().splitlines(), 1) if f"# CULPRIT {kind}" in line)
        for kind in KINDS
    }
    functions = {"sleep": sleep_block, "cpu": cpu_block}
    plan = [(kind, ms) for kind in KINDS for ms in LENGTHS_MS for _ in range(blocks)]
    random.Random(seed).shuffle(plan)
    spans: list[tuple[float, float]] = []

    def app(environ: dict, start_response: object) -> list[bytes]:
        kind, ms = environ["block"]
        start = clock()
        functions[kind](ms / 1000)
        spans.append((start, clock()))
        return [b""]

    wrapped = profiler.middleware(app, prof)
    rng = random.Random(seed + 1)
    for i, (kind, ms) in enumerate(plan):
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/{kind}/{ms}", "tafe.request_id": str(i), "block": (kind, ms)}
        gevent.spawn(wrapped, environ, None).join()
        gevent.sleep(rng.uniform(0.01, 0.15))
    prof.uninstall()

    results = {}
    for kind in KINDS:
        for ms in LENGTHS_MS:
            idx = [i for i, p in enumerate(plan) if p == (kind, ms)]
            g_caught = g_line = p_caught = p_line = 0
            for i in idx:
                start, end = spans[i]
                hits = [r for r in reports if start <= r[0] <= end + 0.001]
                g_caught += bool(hits)
                g_line += any(f"{functions[kind].__name__}" in r[2] and f"line {culprit_lines[kind]}" in r[2] for r in hits)
                mine = [e for e in events if e.request_id == str(i)]
                p_caught += bool(mine)
                p_line += any(e.blocked and e.blocked[-1][1] == culprit_lines[kind] for e in mine)
            results[f"{kind} {ms} ms"] = {"blocks": len(idx), "gevent": g_caught, "gevent_line": g_line,
                                          "profiler": p_caught, "profiler_line": p_line}
    return {
        "max_blocking_time": gevent.config.max_blocking_time,
        "results": results,
        "gevent_reports": len(reports),
        "gevent_report_lines": sorted(r[1] for r in reports),
        "profiler_events": len(events),
        "profiler_realtime": prof.watchdog.realtime,
    }


def run_child(blocks: int, seed: int, max_blocking_time: float | None) -> dict:
    env = dict(os.environ, GEVENT_MONITOR_THREAD_ENABLE="1", GEVENT_PRINT_BLOCKING_REPORTS="0", PYTHONPATH=str(ROOT))
    env.pop("GEVENT_MAX_BLOCKING_TIME", None)
    if max_blocking_time is not None:
        env["GEVENT_MAX_BLOCKING_TIME"] = str(max_blocking_time)
    out = subprocess.run([sys.executable, __file__, "--child", "--blocks", str(blocks), "--seed", str(seed)],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40, help="blocks of each kind and length")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--record", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.blocks, args.seed)))
        return 0
    import common

    command = "python benchmarks/profiler_catch_rate.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    info = common.machine_info(["greenlet"])
    print(f"profiler catch rate\n{common.format_machine(info)}", flush=True)
    runs = [("default (0.1 s)", run_child(args.blocks, args.seed, None)), ("tuned to 0.01 s", run_child(args.blocks, args.seed, 0.01))]
    rows = []
    for label, run in runs:
        for name, r in run["results"].items():
            n = r["blocks"]
            rows.append([name, f"gevent monitor, max_blocking_time {label}", f"{r['gevent']}/{n}", f"{r['gevent_line']}/{n}"])
            rows.append([name, "tafe.profiler, threshold 10 ms (same run)", f"{r['profiler']}/{n}", f"{r['profiler_line']}/{n}"])
    sizes = runs[-1][1]["gevent_report_lines"]
    text = "\n".join([
        f"Command: `{command}`",
        "",
        "```",
        common.format_machine(info),
        "```",
        "",
        f"{args.blocks} blocks of each kind and length in random order, each in its own greenlet (a request through "
        "`tafe.profiler.middleware`), 10-150 ms of cooperative pause between blocks; gevent's monitor and the profiler run "
        "in the same process (the profiler chained to gevent's tracer), so both see the very same blocks. "
        f"Watchdog real-time scheduling: {runs[0][1]['profiler_realtime']}.",
        "",
        common.table(["block", "detector", "caught", "stack names the blocking line"], rows),
        "",
        f"gevent's reports (tuned run): {len(sizes)} reports, "
        + (f"{sizes[len(sizes) // 2]} lines each (median), no aggregation, no request named. " if sizes else "none. ")
        + "The profiler's events: one line of JSON each, aggregated per site, with the request (route, id).",
    ])
    print("\n" + text)
    if args.record:
        common.record(SECTION, "## Profiler catch rate vs gevent's monitor thread\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
