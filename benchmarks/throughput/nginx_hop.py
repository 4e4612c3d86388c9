"""What Nginx in front costs TAFE at a fixed rate: CPU per request, via Nginx against direct.

    python benchmarks/throughput/nginx_hop.py [--rate 4000] [--rounds 4] [--duration 8] [--record]

``run.py`` measures at saturation (closed loop); a node in production runs below it. Here
wrk paces every connection (its Lua ``delay()``: each connection waits before its next
request), so every row gets about ``--rate`` requests a second, and the CPU of the
server's whole session (``tafe serve``, or ``tafe up``: its worker and Nginx's master and
workers) over the measured run is divided by the requests answered. Server pinned to one
core, wrk to the other; one TAFE worker in every row. A third row runs Nginx without
``SCHED_BATCH`` (``--no-nginx-batch``), to show what that saves and what it costs in
latency. Rows alternate in each round and each keeps its lowest CPU per request (the
least disturbed round) among the rounds within 10% of the rate; the ratio of ``tafe up``
as it runs by default to TAFE direct is the Nginx hop. wrk's pacing is open-ended (a
connection waits ``delay`` after each answer, so a slower answer means a lower rate), so
each row's delay is corrected after every round from the rate it got; the rate of every
round is printed beside its CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import run  # noqa: E402
import traffic  # noqa: E402

SECTION = "nginx-hop"
GOAL = 1.2  # issue 16: TAFE + Nginx at most 1.2x the CPU per request of TAFE direct at 4,000 req/s
CONNECTIONS = 128  # many, so that a delay of whole milliseconds sets the rate in steps of ~3%


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=4000, help="requests per second to aim for (all connections)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; each row keeps its lowest CPU per request")
    parser.add_argument("--duration", type=int, default=8, help="measured seconds per row and round")
    parser.add_argument("--record", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()

    have = run.setup(nginx=True, bjoern=False, others=[])
    if not (have["wrk"] and have["nginx"]):
        print("nginx_hop: wrk and nginx are needed (as root, this installs them from Debian)", file=sys.stderr)
        return 1
    server_cpus, load_cpus, pinning = common.split_cores()
    out = common.OUT_DIR / "throughput"
    out.mkdir(parents=True, exist_ok=True)
    body = traffic.sample_body()
    cycle_ms = CONNECTIONS * 1000 / args.rate  # each connection's time from one request to its next
    info = common.machine_info(["wrk", "nginx"])
    port = common.free_port()
    tafe = [sys.executable, "-m", "tafe"]
    rows = [
        {"name": "TAFE direct, 1 worker", "cmd": [*tafe, "serve", "--port", str(port), "--admin-port", "-1", "--workers", "1"], "pin": True},
        {"name": "TAFE via Nginx, 1 worker",
         "cmd": [*tafe, "up", "--port", str(port), "--admin-port", str(common.free_port()), "--workers", "1"], "pin": True},
        # The same without SCHED_BATCH for Nginx (tafe.nginx.Nginx.start): what batching saves, and its latency.
        {"name": "TAFE via Nginx, 1 worker, --no-nginx-batch",
         "cmd": [*tafe, "up", "--port", str(port), "--admin-port", str(common.free_port()), "--workers", "1",
                 "--no-nginx-batch"], "pin": True},
    ]  # fmt: skip
    measured = argparse.Namespace(warmup=2, duration=args.duration, connections=CONNECTIONS)
    print(f"nginx_hop: {CONNECTIONS} connections, each sending every {cycle_ms:.0f} ms (aiming at {args.rate:,} req/s), "
          f"{args.duration} s per row and round, {args.rounds} rounds\n{pinning}\n{common.format_machine(info)}", flush=True)
    best: dict[str, dict] = {}
    per_round: dict[str, list[str]] = {}
    delays = {row["name"]: max(0, round(cycle_ms) - 1) for row in rows}  # about 1 ms of the cycle is the answer
    with tempfile.TemporaryDirectory(prefix="tafe-hop-"):
        for rnd in range(args.rounds):
            for row in rows:
                name, slug = row["name"], re.sub(r"[^a-z0-9]+", "-", row["name"].lower()).strip("-")
                script = out / f"paced-{slug}.lua"
                script.write_text(run.LUA.format(body=body.decode()) + f"delay = function() return {delays[name]} end\n")
                r = run.measure(row, port, script, body, measured, out / f"hop-{slug}.log", server_cpus, load_cpus)
                if r is None:
                    return 1
                print(f"  round {rnd + 1} {name}: delay {delays[name]} ms, {r['rps']:,.0f} req/s, {r['cpu_us']:.1f} CPU us "
                      f"per request, p50 {r['p50_us'] / 1000:.2f} ms, p99 {r['p99_us'] / 1000:.2f} ms, "
                      f"load avg {os.getloadavg()[0]:.1f}", flush=True)
                per_round.setdefault(name, []).append(f"{r['cpu_us']:.1f} ({r['rps'] / 1000:.2f}k)")
                on_rate = abs(r["rps"] / args.rate - 1) <= 0.10
                r["on_rate"] = on_rate
                if name not in best or (on_rate, -r["cpu_us"]) > (best[name]["on_rate"], -best[name]["cpu_us"]):
                    best[name] = r
                # Correct the delay for the next round: the answer's share of the cycle is what the rate says it was.
                answer_ms = CONNECTIONS * 1000 / max(r["rps"], 1) - delays[name]
                delays[name] = max(0, round(cycle_ms - answer_ms))
    direct, hop = best[rows[0]["name"]], best[rows[1]["name"]]
    ratio = hop["cpu_us"] / direct["cpu_us"]
    command = "python benchmarks/throughput/nginx_hop.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    table = common.table(
        ["server", "req/s", "CPU us per request (lowest on rate)", "per round: CPU us (req/s)", "p50 ms", "p99 ms", "vs direct"],
        [[name, f"{r['rps']:,.0f}", f"{r['cpu_us']:.1f}" + ("" if r["on_rate"] else " (off rate)"), " ".join(per_round[name]),
          f"{r['p50_us'] / 1000:.2f}", f"{r['p99_us'] / 1000:.2f}", f"{r['cpu_us'] / direct['cpu_us']:.2f}x"]
         for name, r in best.items()],
    )  # fmt: skip
    verdict = "met" if ratio <= GOAL else "**not met**"
    report = (
        f"    {command}\n\n{common.format_machine(info)}\n\n{pinning}. {CONNECTIONS} keep-alive connections, each waiting "
        f"after every answer so as to send every {cycle_ms:.0f} ms (aiming at {args.rate:,} req/s; the wait is corrected "
        f"after every round from the rate it gave); CPU of the server's whole session (Nginx's processes too) over "
        f"{args.duration} s, per request answered.\n\n{table}\n\n"
        f"Goal: TAFE via Nginx at most {GOAL}x the CPU per request of TAFE direct: {verdict} ({ratio:.2f}x, "
        f"the lowest of each among its rounds within 10% of the rate; the goal is for `tafe up` as it runs by default).\n"
    )
    print("\n" + report)
    if args.record:
        common.record(SECTION, "## The Nginx hop at a fixed rate: CPU per request, via Nginx against direct\n\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
