"""A recorded load test: a whole TAFE node (``tafe up``: Nginx + workers) under the locustfile.

    python benchmarks/loadtest.py [--users 32] [--duration 30] [--workers 1] [--record]

For a TAFE that is already running, use ``make loadtest HOST=...`` instead; this script
exists so that ``make bench`` can record an exchange-like load test next to the
benchmarks, with the same machine details. The node and locust are pinned to different
cores where possible. Exit status is locust's: non-zero when any answer failed validation.
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
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import traffic  # noqa: E402

SECTION = "loadtest"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32, help="locust users (keep-alive exchange connections)")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load")
    parser.add_argument("--workers", type=int, default=1, help="TAFE workers behind Nginx (0: one per core)")
    parser.add_argument("--record", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()

    common.ensure_debian({"nginx": "nginx"})
    server_cpus, load_cpus, pinning = common.split_cores()
    if args.workers != 1:
        server_cpus, load_cpus, pinning = None, None, "not pinned (the node uses every core)"
    out = common.OUT_DIR / "loadtest"
    out.mkdir(parents=True, exist_ok=True)
    port, admin = common.free_port(), common.free_port()
    node = common.start(
        [sys.executable, "-m", "tafe", "up", "--port", str(port), "--admin-port", str(admin), "--workers", str(args.workers)],
        out / "node.log",
        cpus=server_cpus,
    )
    summary = out / "summary.json"
    summary.unlink(missing_ok=True)
    locust = common.pinned(
        [str(common.VENV_BIN / "locust"), "-f", str(HERE / "locustfile.py"), "--headless", "--host", f"http://127.0.0.1:{port}",
         "-u", str(args.users), "-r", str(args.users), "-t", f"{args.duration}s", "--stop-timeout", "5",
         "--csv", str(out / "locust"), "--only-summary"],
        load_cpus,
    )
    try:
        common.wait_port(port, timeout=60, proc=node)
        proc = subprocess.run(locust, env={**os.environ, "TRAFFIC_SUMMARY": str(summary)}, capture_output=True, text=True,
                              timeout=args.duration + 120)
    finally:
        common.stop(node)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr[-4000:])
    if not summary.exists():
        return proc.returncode or 1
    s = json.loads(summary.read_text())
    info = common.machine_info(["nginx", "locust"])
    report = render(s, args, info, pinning, shlex.join(locust))
    print("\n" + report)
    if args.record:
        common.record(SECTION, "## Load test: exchange-like traffic on a TAFE node (locust)\n\n" + report)
    return proc.returncode


def render(s: dict, args: argparse.Namespace, info: dict, pinning: str, locust_cmd: str) -> str:
    mix = traffic.Mix.from_env()
    rows = [[s["requests"], s["rps"], s["bid_p50_ms"], s["bid_p95_ms"], s["bid_p99_ms"], s["failures"], f"{s['bid_rate']:.1%}",
             s["bids"], s["win_notices"]]]
    lines = [
        f"`tafe up --workers {args.workers}` (Nginx in front) under {args.users} locust users sending back to back for "
        f"{args.duration} s; every answer validated (see README, Load testing). {pinning.capitalize()}. "
        "Closed loop: this measures a whole node under exchange-like traffic, not a tail at a fixed rate.",
        "",
        common.table(["requests", "req/s", "bid p50 ms", "bid p95 ms", "bid p99 ms", "failures", "bid rate", "bids", "win notices"], rows),
        "",
        "Traffic mix (`benchmarks/traffic.py:Mix`, `TRAFFIC_*`): "
        + ", ".join(f"{k}={v}" for k, v in vars(mix).items()),
    ]
    if s["failure_reasons"]:
        lines += ["", "Failures:", ""] + [f"- {n} x {reason}" for reason, n in s["failure_reasons"].items()]
    lines += ["", "Machine:", "", "```", common.format_machine(info), "```", "", "Command:", "", "```",
              "python benchmarks/loadtest.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]), locust_cmd, "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
