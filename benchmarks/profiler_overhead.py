"""Cost of the greenlet profiler on the TAFE bid workload: off, threshold-only, 100% sampled.

    python benchmarks/profiler_overhead.py [--rounds 7] [--duration 5] [--connections 64] [--record]

1. In process: CPU cost of the tracer hook per greenlet switch (greenlet ping-pong,
   best of 7), with no hook, threshold-only, and with the switching greenlet sampled;
   then CPU per bid request of ``tafe.wsgi:application`` driven by 64 greenlets, per
   mode, interleaved rounds (hub thread plus watchdog thread CPU).
2. Over HTTP: three ``tafe serve --workers 1`` processes (``tafe.wsgi`` bid app, TAFE's
   own server) with ``--block-threshold-ms 0`` (off), ``10`` (threshold-only) and
   ``10 --profile-sample 1`` (every request's spans recorded), all pinned to the server
   core; ``wrk`` (pinned to the other core) POSTs a ~1.5 KB OpenRTB request to each in
   turn, interleaved (off, thr, 100%, off, ...) so that outside load spreads over all
   three. Prints medians, the ratio of medians and the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import traffic  # noqa: E402
from throughput.run import LUA, probe, wrk  # noqa: E402

SECTION = "profiler-overhead"
MODES = {
    "off": ["--block-threshold-ms", "0"],
    "threshold-only": ["--block-threshold-ms", "10", "--profile-sample", "0"],
    "100% sampled": ["--block-threshold-ms", "10", "--profile-sample", "1"],
}


def switch_cost(switches: int = 200_000, repeats: int = 7) -> dict[str, float]:
    """CPU nanoseconds per greenlet switch (best of ``repeats``), per profiler state."""
    import gevent
    import greenlet

    from tafe import profiler

    def pingpong() -> float:
        main = greenlet.getcurrent()
        peer = greenlet.greenlet(lambda: [main.switch() for _ in iter(int, 1)])
        peer.switch()
        t = time.thread_time()  # this thread's CPU: other load on the host stays out of it
        for _ in range(switches // 2):
            peer.switch()
        took = time.thread_time() - t
        return took / switches * 1e9

    def best() -> float:
        return min(pingpong() for _ in range(repeats))

    gevent.get_hub()
    out = {"no hook": best()}
    prof = profiler.install(threshold_ms=10, log=False)
    out["threshold-only"] = best()
    # The main greenlet registered as a sampled request: every span is appended.
    spans: list[float] = []
    prof.sampled[greenlet.getcurrent()] = spans
    out["sampled"] = best()
    prof.uninstall()
    return out


def bid_cpu_in_process(rounds: int, requests: int, body: bytes) -> dict[str, list[float]]:
    """CPU microseconds per bid request, in this process, per mode, interleaved rounds.

    64 greenlets each loop: yield to the hub (``gevent.sleep(0)``: the two switches a
    keep-alive request costs in a gevent server), then call ``tafe.wsgi:application``
    (wrapped in the profiler's middleware when on) on a ~1.5 KB OpenRTB body. CPU is the
    hub thread's (``time.thread_time``) plus the watchdog thread's (its schedstat), so
    neither the network stack nor other processes on the host enter the figure.
    """
    import io

    import gevent

    from tafe import profiler
    from tafe.wsgi import application

    def environ() -> dict:
        return {"REQUEST_METHOD": "POST", "PATH_INFO": "/openrtb2/bid", "QUERY_STRING": "", "CONTENT_TYPE": "application/json",
                "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), "SERVER_PROTOCOL": "HTTP/1.1",
                "HTTP_X_OPENRTB_VERSION": "2.5", "wsgi.url_scheme": "http", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080"}

    def start_response(status: str, headers: list, exc_info: object = None) -> None:
        assert status[:3] in ("200", "204"), status

    def run(app: object, n: int) -> None:
        left = [n]

        def conn() -> None:
            while left[0] > 0:
                left[0] -= 1
                gevent.sleep(0)
                b"".join(app(environ(), start_response))

        gevent.joinall([gevent.spawn(conn) for _ in range(64)])

    out: dict[str, list[float]] = {m: [] for m in MODES}
    settings = {"off": None, "threshold-only": 0.0, "100% sampled": 1.0}
    run(application, 2000)  # warm-up
    for rnd in range(rounds):
        order = list(MODES) if rnd % 2 == 0 else list(reversed(MODES))
        for mode in order:
            prof = None if settings[mode] is None else profiler.install(threshold_ms=10, sample=settings[mode], log=False)
            app = application if prof is None else profiler.middleware(application, prof)
            wd0 = prof.watchdog.cpu_seconds() or 0.0 if prof else 0.0
            t0 = time.thread_time()
            run(app, requests)
            cpu = time.thread_time() - t0 + ((prof.watchdog.cpu_seconds() or 0.0) - wd0 if prof else 0.0)
            if prof:
                prof.uninstall()
            out[mode].append(cpu / requests * 1e6)
    return out


def instructions_per_request(body: bytes) -> dict[str, float] | None:
    """Instructions per bid request under valgrind (cachegrind): deterministic, so the one
    figure here that other load on the host cannot move. Each mode runs the in-process
    workload twice (200 and 2,200 requests after a warm-up) and the difference is divided
    by 2,000 (PYTHONHASHSEED fixed; threshold out of reach, so no span becomes an event).
    The watchdog thread is stopped here: under valgrind everything runs ~50x
    slower, so its wall-clock wake-ups would be ~50x too many per request; its real cost is
    its own CPU time, measured natively above."""
    import shutil
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    if not shutil.which("valgrind"):
        return None

    def irefs(mode: str, n: int) -> int:
        cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
               sys.executable, __file__, "--instructions-child", mode, str(n)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONHASHSEED": "0"})
        return int(next(line for line in out.stderr.splitlines() if "I   refs" in line).split(":")[1].replace(",", ""))

    with ThreadPoolExecutor(2) as pool:
        counts = {(m, n): pool.submit(irefs, m, n) for m in MODES for n in (200, 2200)}
        return {m: (counts[m, 2200].result() - counts[m, 200].result()) / 2000 for m in MODES}


def instructions_child(mode: str, n: int) -> None:
    import io

    import gevent

    from tafe import profiler
    from tafe.wsgi import application

    body = traffic.sample_body()

    def environ() -> dict:
        return {"REQUEST_METHOD": "POST", "PATH_INFO": "/openrtb2/bid", "QUERY_STRING": "", "CONTENT_TYPE": "application/json",
                "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body), "SERVER_PROTOCOL": "HTTP/1.1",
                "HTTP_X_OPENRTB_VERSION": "2.5", "wsgi.url_scheme": "http", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080"}

    def run(app: object, count: int) -> None:
        left = [count]

        def conn() -> None:
            while left[0] > 0:
                left[0] -= 1
                gevent.sleep(0)
                b"".join(app(environ(), lambda *a: None))

        gevent.joinall([gevent.spawn(conn) for _ in range(64)])

    run(application, 200)
    prof = None
    if mode != "off":
        # Under valgrind a request takes milliseconds: a 10 ms threshold would turn ordinary
        # spans into blocking events. Their cost is not what is measured here.
        prof = profiler.install(threshold_ms=60_000, sample=1.0 if mode == "100% sampled" else 0.0, log=False)
        prof.watchdog.stop()
    run(application if prof is None else profiler.middleware(application, prof), n)


def start_servers(port_base: dict[str, tuple[int, int]], out: Path, cpus: list[int]) -> dict[str, Any]:
    procs = {}
    for mode, args in MODES.items():
        port, admin = port_base[mode]
        cmd = [sys.executable, "-m", "tafe", "serve", "--workers", "1", "--port", str(port), "--admin-port", str(admin), *args]
        log = out / f"server-{mode.split()[0].replace('%', '')}.log"
        log.unlink(missing_ok=True)
        procs[mode] = common.start(cmd, log, env={"PYTHONUNBUFFERED": "1"}, cpus=cpus)
    for mode, proc in procs.items():
        common.wait_port(port_base[mode][0], timeout=60, proc=proc)
    return procs


def group_cpu_ns(pgid: int) -> int:
    """On-CPU nanoseconds of every thread of every process in the group (Linux schedstat):
    the server's CPU cost, far less disturbed by other load on the host than req/s."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            for task in (proc / "task").iterdir():
                total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def debug_report(admin: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/debug/blocking", timeout=5) as resp:
            return json.loads(resp.read())
    except OSError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (off, thr, 100%% each)")
    parser.add_argument("--duration", type=int, default=5, help="measured seconds per mode and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--inproc-requests", type=int, default=20000, help="bid requests per mode and round, in process")
    parser.add_argument("--record", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    parser.add_argument("--instructions-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.instructions_child:
        instructions_child(args.instructions_child[0], int(args.instructions_child[1]))
        return 0
    if common.ensure_debian({"wrk": "wrk"}):
        print("profiler_overhead: wrk is missing and could not be installed", file=sys.stderr)
        return 1
    command = "python benchmarks/profiler_overhead.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    server_cpus, load_cpus, pinning = common.split_cores()
    info = common.machine_info(["wrk", "greenlet", "prometheus-client"])
    print(f"profiler overhead\n{pinning}\n{common.format_machine(info)}", flush=True)

    micro = switch_cost()
    print("hook cost per greenlet switch: " + ", ".join(f"{k} {v:.0f} ns" for k, v in micro.items()), flush=True)
    body = traffic.sample_body()
    inproc = bid_cpu_in_process(args.rounds, args.inproc_requests, body)
    print("in-process bid CPU per request (median): " + ", ".join(f"{m} {statistics.median(v):.2f} us" for m, v in inproc.items()),
          flush=True)
    instructions = instructions_per_request(body)
    if instructions:
        print("instructions per request (valgrind): " + ", ".join(f"{m} {v:,.0f}" for m, v in instructions.items()), flush=True)

    out = common.OUT_DIR / "profiler"
    out.mkdir(parents=True, exist_ok=True)
    script = out / "post.lua"
    script.write_text(LUA.format(body=body.decode()))
    ports = {mode: (common.free_port(), common.free_port()) for mode in MODES}
    rps: dict[str, list[float]] = {m: [] for m in MODES}
    p99: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}  # server CPU microseconds per request
    procs = start_servers(ports, out, server_cpus)
    try:
        time.sleep(1.0)
        for mode in MODES:
            status, answer = probe(ports[mode][0], body)
            print(f"  {mode}: probe answered {status} ({len(answer)} B)", flush=True)
            wrk(ports[mode][0], script, args.warmup, args.connections, load_cpus)
        for rnd in range(args.rounds):
            order = list(MODES) if rnd % 2 == 0 else list(reversed(MODES))  # no mode always first
            for mode in order:
                before = group_cpu_ns(procs[mode].pid)
                r = wrk(ports[mode][0], script, args.duration, args.connections, load_cpus)
                cpu[mode].append((group_cpu_ns(procs[mode].pid) - before) / 1000 / max(r["requests"], 1))
                errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
                rps[mode].append(r["rps"])
                p99[mode].append(r["p99_us"] / 1000)
                print(f"  round {rnd + 1}/{args.rounds} {mode:>15}: {r['rps']:>8,.0f} req/s  {cpu[mode][-1]:.1f} us CPU/req  "
                      f"p99 {r['p99_us'] / 1000:.2f} ms  "
                      f"{errors} errors  load avg {os.getloadavg()[0]:.1f}", flush=True)
        reports = {mode: debug_report(ports[mode][1]) for mode in MODES if mode != "off"}
    finally:
        for proc in procs.values():
            common.stop(proc)
    text = render(args, command, pinning, info, micro, inproc, instructions, rps, p99, cpu, reports, len(body))
    print("\n" + text)
    if args.record:
        common.record(SECTION, "## Profiler overhead on the bid workload\n\n" + text)
    return 0


def render(args: argparse.Namespace, command: str, pinning: str, info: dict, micro: dict, inproc: dict,
           instructions: dict | None, rps: dict, p99: dict, cpu: dict, reports: dict, body_len: int) -> str:
    base = statistics.median(rps["off"])
    base_cpu = statistics.median(cpu["off"])
    rows = []
    for mode in MODES:
        med = statistics.median(rps[mode])
        per_round = statistics.median(a / b for a, b in zip(rps[mode], rps["off"]))
        med_cpu = statistics.median(cpu[mode])
        rows.append([mode, f"{med:,.0f}", f"{med / base:.3f}", f"{per_round:.3f}", f"{med_cpu:.1f}",
                     f"{(med_cpu / base_cpu - 1) * 100:+.1f}%", f"{statistics.median(p99[mode]):.2f}",
                     " ".join(f"{x:,.0f}" for x in rps[mode])])
    sampled = (reports.get("100% sampled") or {}).get("sampled_routes", {})
    spans = next(iter(sampled.values()), None)
    blocking = {m: (r or {}).get("events") for m, r in reports.items()}
    base_in = statistics.median(inproc["off"])
    inproc_rows = [[m, f"{statistics.median(v):.2f}", f"{min(v):.2f}", f"{statistics.median(v) / base_in:.3f}",
                    f"{(statistics.median(v) / base_in - 1) * 100:+.2f}%", " ".join(f"{x:.1f}" for x in v)]
                   for m, v in inproc.items()]
    lines = [
        f"Command: `{command}`",
        "",
        "```",
        common.format_machine(info),
        "```",
        "",
        f"**In process** (the cost itself): {args.inproc_requests:,} bid requests per mode and round, {args.rounds} interleaved "
        "rounds (order alternating). `tafe.wsgi:application` (wrapped in the profiler's middleware when on) is called by 64 "
        "greenlets that each yield to the hub between requests (the two greenlet switches a keep-alive request costs in a "
        f"gevent server), on the same {body_len}-byte OpenRTB 2.5 request. CPU = the hub thread's (`time.thread_time`) plus the "
        "watchdog thread's (its schedstat), per request: no network, no other process in the figure.",
        "",
        common.table(["profiler", "CPU us/request (median)", "best round", "vs off (medians)", "overhead", "per round"], inproc_rows),
        "",
        *([
            "Instructions per request under valgrind (cachegrind; same in-process workload, watchdog thread stopped, no span over the threshold, "
            "deterministic): " + ", ".join(
                f"{m} {v:,.0f} ({(v / instructions['off'] - 1) * 100:+.2f}%)" for m, v in instructions.items()),
            "",
        ] if instructions else []),
        "Tracer hook alone, hub-thread CPU per greenlet switch (greenlet ping-pong, best of 7 x 200k switches): "
        + ", ".join(f"{k} {v:.0f} ns" for k, v in micro.items())
        + f", i.e. the hook adds {micro['threshold-only'] - micro['no hook']:.0f} ns per switch threshold-only and "
        f"{micro['sampled'] - micro['no hook']:.0f} ns when the switching greenlet is sampled.",
        "",
        f"**Over HTTP** (TAFE's own server, `tafe serve --workers 1`, one process per mode, all three up at once): wrk 1 thread, "
        f"{args.connections} keep-alive connections POSTing the same request; {args.rounds} interleaved rounds of "
        f"{args.duration} s per mode (order alternating), after a {args.warmup} s warm-up each. {pinning.capitalize()}. "
        "Server CPU/request is the on-CPU time of every thread of the server's processes (Linux schedstat, the watchdog "
        "included) over the requests completed in the round.",
        "",
        common.table(["profiler", "median req/s", "req/s vs off (medians)", "req/s vs off (median of per-round ratios)",
                      "server CPU us/request (median)", "CPU/request vs off", "median p99 ms", "req/s per round"], rows),
    ]
    if spans:
        lines.append(
            f"Sampled bid requests: {spans['spans_per_request']} spans per request, "
            f"{spans['loop_ms_per_request']} ms of loop time per request, span p50/p99/max "
            f"{spans['span_p50_ms']}/{spans['span_p99_ms']}/{spans['span_max_ms']} ms."
        )
    lines.append(f"Spans over 10 ms seen during the run (events): {blocking}.")
    watch = {m: (r or {}).get("watchdog") for m, r in reports.items()}
    lines.append("Watchdog threads over the whole run (all rounds and warm-ups): " + "; ".join(
        f"{m}: {w['wakeups']:,} wake-ups, {w['cpu_s']:.3f} s CPU ({w['cpu_s'] / max(w['wakeups'], 1) * 1e6:.0f} us per wake-up)"
        for m, w in watch.items() if w and w.get("cpu_s") is not None) + ".")
    thr = watch.get("threshold-only")
    if thr and thr.get("cpu_s") is not None:
        per_wake = thr["cpu_s"] / max(thr["wakeups"], 1)
        rate = statistics.median(rps["threshold-only"])
        lines += [
            "",
            f"Reading: the hook and the middleware cost what the in-process and valgrind rows show. The watchdog is a fixed "
            f"cost per second, not per request: about 1/threshold = 100 wake-ups/s, here {per_wake * 1e6:.0f} us of CPU each "
            f"(sleep timer, GIL hand-off and scheduler work on this virtual machine), i.e. {per_wake * 100 * 100:.1f}% of a core "
            f"whatever the traffic, or {per_wake * 100 / rate * 1e6:.1f} us per request at the {rate:,.0f} req/s measured here. "
            "The CPU/request column of the HTTP table includes it.",
        ]
    goal_thr = statistics.median(rps["threshold-only"]) / base
    goal_all = statistics.median(rps["100% sampled"]) / base
    lines += [
        "",
        f"Goals (issue 4), req/s vs off over HTTP: threshold-only {(1 - goal_thr) * 100:+.1f}% (goal <= 1%: "
        f"{'met' if goal_thr >= 0.99 else 'NOT met'}), 100% sampled {(1 - goal_all) * 100:+.1f}% (goal <= 3%: "
        f"{'met' if goal_all >= 0.97 else 'NOT met'}); in process (CPU/request) threshold-only "
        f"{(statistics.median(inproc['threshold-only']) / base_in - 1) * 100:+.1f}%, 100% sampled "
        f"{(statistics.median(inproc['100% sampled']) / base_in - 1) * 100:+.1f}%.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
