"""Throughput of the CPU-bound bid path: TAFE beside other servers, in ONE run.

    python benchmarks/throughput/run.py [--duration 10] [--connections 64] [--record]

``wrk`` (64 keep-alive connections, a Lua script POSTing a ~1.5 KB OpenRTB request)
measures, one after the other on the same machine:

- one worker, direct: TAFE (``tafe serve``), the same TAFE sending every answer at once
  (``--send-batch-us 0``: what holding answers for a batch gains), ``gunicorn -k gevent``, stock
  ``gevent.pywsgi`` (with TCP_NODELAY), ``bjoern`` (C), ``meinheld`` (C, greenlets) and
  ``granian`` (Rust) where they install, all serving the same ``tafe.wsgi:application``;
- TAFE behind Nginx (``tafe up``): one worker, then one worker per core;
- Nginx answering a fixed BidResponse itself: the ceiling of any backend behind it here.

Server and wrk are pinned to different cores (taskset) when the machine has two or more;
the all-cores rows cannot be, and say so. Prints req/s, p50/p99, the ratios to
``gunicorn -k gevent`` and, per round, TAFE / bjoern and TAFE / granian;
``--instructions`` adds callgrind's instructions per request for TAFE and bjoern
(``instructions.py``, a few minutes under valgrind); ``--record`` replaces this
benchmark's section of RESULTS.md.

Setup: installs ``wrk``, ``nginx`` and ``libev-dev`` from Debian when missing (as root),
then tries ``pip install bjoern``, ``granian`` and ``meinheld`` (``--no-deps``: its
greenlet < 0.5 pin does not build on Python 3.11); a row whose server does not install
or start is left out and said so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import common  # noqa: E402
import instructions  # noqa: E402
import traffic  # noqa: E402

SECTION = "throughput"
BID_PATH = "/openrtb2/bid"
UNBATCHED = "TAFE, unbatched answers (--send-batch-us 0), 1 worker direct"
LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-openrtb-version"] = "2.5"
wrk.body = [==[{body}]==]

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""
NGINX_FIXED = """\
daemon off;
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""


def setup(nginx: bool, bjoern: bool, others: list[str]) -> dict[str, bool]:
    """Install what the chosen rows need; say what is there."""
    needs = {"wrk": "wrk"}
    if nginx:
        needs["nginx"] = "nginx"
    if bjoern:
        needs["/usr/include/ev.h"] = "libev-dev"
    missing = common.ensure_debian(needs)
    has_bjoern = False
    if bjoern:
        check = [sys.executable, "-c", "import bjoern"]
        if subprocess.run(check, capture_output=True).returncode != 0 and Path("/usr/include/ev.h").exists():
            print("setup: pip install bjoern", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "bjoern"], check=False)
        has_bjoern = subprocess.run(check, capture_output=True).returncode == 0
    has = {"wrk": "wrk" not in missing, "nginx": nginx and "nginx" not in missing, "bjoern": has_bjoern}
    for name, extra in (("granian", []), ("meinheld", ["--no-deps"])):
        if name not in others:
            continue
        check = [sys.executable, "-c", f"import {name}"]
        if subprocess.run(check, capture_output=True).returncode != 0:
            print(f"setup: pip install {' '.join(extra)} {name}", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *extra, name], check=False)
        has[name] = subprocess.run(check, capture_output=True).returncode == 0
        if not has[name]:
            print(f"setup: {name} does not install here: its row is left out", flush=True)
    return has


def probe(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", BID_PATH, body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wrk(port: int, script: Path, seconds: float, connections: int, cpus: list[int] | None) -> dict:
    cmd = common.pinned(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "5s", "-s", str(script), f"http://127.0.0.1:{port}{BID_PATH}"],
        cpus,
    )
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON ") :])
            data["rps"] = data["requests"] / (data["duration_us"] / 1e6)
            data["command"] = shlex.join(cmd)
            return data
    raise RuntimeError(f"wrk printed no result: {out.stdout}\n{out.stderr}")


def configs(args: argparse.Namespace, port: int, tmp: Path, have: dict[str, bool], body: bytes) -> list[dict]:
    """Each row: a name, the server command, whether it can be pinned to the server cores."""
    py, app = sys.executable, args.app
    serve = [py, str(HERE / "serve.py")]
    gunicorn = [str(common.VENV_BIN / "gunicorn"), "-w", "1", "-b", f"127.0.0.1:{port}", "--keep-alive", "75"]
    gunicorn += ["--backlog", "2048", "--log-level", "warning", "-k", "gevent", "--worker-connections", "10000", app]
    tafe = [py, "-m", "tafe"]
    admin = str(common.free_port())
    # TAFE and the servers it is held against run back to back: their ratios within a round are the fair ones.
    rows = [{"name": "TAFE, 1 worker direct", "cmd": [*tafe, "serve", "--port", str(port), "--admin-port", "-1", "--workers", "1"], "pin": True}]
    if have["bjoern"]:
        rows.append({"name": "bjoern (C), 1 worker", "cmd": [*serve, "bjoern", app, "--port", str(port)], "pin": True})
    if have.get("meinheld"):
        rows.append({"name": "meinheld (C), 1 worker", "cmd": [*serve, "meinheld", app, "--port", str(port)], "pin": True})
    if have.get("granian"):
        granian = [str(common.VENV_BIN / "granian"), "--interface", "wsgi", "--workers", "1", "--host", "127.0.0.1"]
        granian += ["--port", str(port), "--backlog", "2048", "--no-ws", "--log-level", "warning", app]
        rows.append({"name": "granian (Rust), 1 worker", "cmd": granian, "pin": True})
    # The same TAFE sending every answer at once: what holding answers for a batch (send_batch_us) gains.
    rows.append({"name": UNBATCHED, "cmd": [*rows[0]["cmd"], "--send-batch-us", "0"], "pin": True})
    rows += [
        {"name": "gunicorn -k gevent, 1 worker", "cmd": gunicorn, "pin": True, "baseline": True},
        {"name": "gevent.pywsgi, 1 worker", "cmd": [*serve, "pywsgi", app, "--port", str(port)], "pin": True},
    ]
    if have["nginx"]:
        up = [*tafe, "up", "--port", str(port), "--admin-port", admin]
        rows += [
            {"name": "TAFE via Nginx, 1 worker", "cmd": [*up, "--workers", "1"], "pin": True},
            {"name": f"TAFE via Nginx, {len(common.cores())} workers (all cores)", "cmd": [*up, "--workers", "0"], "pin": False},
        ]
        fixed = tmp / "nginx-fixed"
        for sub in ("", "body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (fixed / sub).mkdir(parents=True, exist_ok=True)
        answer = json.dumps({"id": json.loads(body)["id"], "cur": "USD", "seatbid": [{"seat": "tafe", "bid": [
            {"id": "1", "impid": "1", "price": 1.23, "adm": "<div>fixed</div>", "adomain": ["example.com"], "crid": "c1", "w": 300, "h": 250}]}]})
        for workers, pin, label in ((1, True, "1 worker"), ("auto", False, "all cores")):
            conf = fixed / f"nginx-{label.replace(' ', '-')}.conf"
            conf.write_text(NGINX_FIXED.format(workers=workers, root=fixed, port=port, body=answer))
            rows.append({"name": f"Nginx fixed body (ceiling), {label}", "cmd": ["nginx", "-p", str(fixed), "-c", str(conf)], "pin": pin})
    return rows


def measure(row: dict, port: int, script: Path, body: bytes, args: argparse.Namespace, log: Path,
            server_cpus: list[int], load_cpus: list[int]) -> dict | None:
    """One round of one row: start the server, check its answer, warm up, measure, stop."""
    cpus = server_cpus if row["pin"] else None
    proc = common.start(row["cmd"], log, env={"PYTHONUNBUFFERED": "1"}, cpus=cpus)
    try:
        common.wait_port(port, timeout=60, proc=proc)
        time.sleep(0.5)
        status, answer = probe(port, body)
        wrk(port, script, args.warmup, args.connections, load_cpus if row["pin"] else None)
        cpu = common.group_cpu_seconds(proc.pid)
        r = wrk(port, script, args.duration, args.connections, load_cpus if row["pin"] else None)
        r["cpu_us"] = (common.group_cpu_seconds(proc.pid) - cpu) / max(r["requests"], 1) * 1e6
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"  {row['name']}: FAILED: {exc} (see {log})", flush=True)
        return None
    finally:
        common.stop(proc)
        time.sleep(0.5)
    r.update(name=row["name"], pinned=row["pin"], answer_status=status, answer_bytes=len(answer),
             server=shlex.join(common.pinned(row["cmd"], cpus)), baseline=row.get("baseline", False))
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=6, help="measured seconds per row and round (after a short warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each row keeps its best")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--app", default="tafe.wsgi:application", help="WSGI app the non-TAFE servers serve")
    parser.add_argument("--only", action="append", help="run only rows whose name contains this (repeatable)")
    parser.add_argument("--instructions", type=int, default=0, metavar="N",
                        help="also count instructions per request of TAFE and bjoern over N requests under callgrind")
    parser.add_argument("--record", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()

    chosen = lambda name: not args.only or any(o.lower() in name.lower() for o in args.only)  # noqa: E731
    nginx_rows = ("TAFE via Nginx, 1 worker", "TAFE via Nginx, all cores", "Nginx fixed body (ceiling), 1 worker, all cores")
    others = [name for name in ("granian", "meinheld") if chosen(name)]
    have = setup(nginx=any(map(chosen, nginx_rows)), bjoern=chosen("bjoern (C), 1 worker"), others=others)
    if not have["wrk"]:
        print("throughput: wrk is missing and could not be installed", file=sys.stderr)
        return 1
    server_cpus, load_cpus, pinning = common.split_cores()
    info = common.machine_info(["wrk", "nginx", "gunicorn", "bjoern", "orjson", "httptools"])
    out = common.OUT_DIR / "throughput"
    out.mkdir(parents=True, exist_ok=True)
    body = traffic.sample_body()
    script = out / "post.lua"
    script.write_text(LUA.format(body=body.decode()))
    command = "python benchmarks/throughput/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"throughput: wrk -t1 -c{args.connections}, {len(body)}-byte OpenRTB POST, {args.duration:g} s per row and round, "
          f"{args.rounds} rounds, after {args.warmup:g} s warm-up\n{pinning}\n{common.format_machine(info)}", flush=True)
    best: dict[str, dict] = {}
    per_round: dict[str, list[float]] = {}  # req/s of each row in each round, for the paired ratios
    port = common.free_port()
    with tempfile.TemporaryDirectory(prefix="tafe-tput-") as tmp:
        rows = [r for r in configs(args, port, Path(tmp), have, body) if chosen(r["name"])]
        # Rounds interleave the rows so that a burst of outside load does not land on one row only;
        # each row keeps its best round (the one least disturbed).
        for rnd in range(args.rounds):
            for row in rows:
                log = out / (re.sub(r"[^a-z0-9]+", "-", row["name"].lower()).strip("-") + ".log")
                if rnd == 0:
                    log.unlink(missing_ok=True)
                r = measure(row, port, script, body, args, log, server_cpus, load_cpus)
                if r is None:
                    continue
                r["loadavg"] = f"{os.getloadavg()[0]:.1f}"
                errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
                print(f"  round {rnd + 1}/{args.rounds} {row['name']}: {r['rps']:,.0f} req/s, p50 {r['p50_us'] / 1000:.2f} ms, "
                      f"p99 {r['p99_us'] / 1000:.2f} ms, answer {r['answer_status']} ({r['answer_bytes']} B), {errors} errors, "
                      f"load avg {r['loadavg']}", flush=True)
                per_round.setdefault(row["name"], []).append(r["rps"])
                if row["name"] not in best or r["rps"] > best[row["name"]]["rps"]:
                    best[row["name"]] = r
    results = [best[row["name"]] for row in rows if row["name"] in best]
    if not results:
        return 1
    if args.instructions:
        port = common.free_port()
        for name, cmd in instructions.servers(port).items():
            if name not in best:
                continue
            log = out / ("callgrind-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + ".log")
            try:
                counted = instructions.count(cmd, port, body, log, requests=args.instructions, connections=16, warmup=500)
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"  {name}: callgrind FAILED: {exc} (see {log})", flush=True)
                continue
            best[name]["instructions"] = counted["per_request"]
            print(f"  {name}: {counted['per_request']:,.0f} instructions per request under callgrind", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = render(results, args, info, pinning, command, len(body), per_round)
    print("\n" + report)
    if args.record:
        common.record(SECTION, "## Throughput of the CPU-bound bid path (wrk, closed loop)\n\n" + report)
    return 0


def render(
    results: list[dict], args: argparse.Namespace, info: dict, pinning: str, command: str, body_len: int,
    per_round: dict[str, list[float]],
) -> str:
    base = next((r for r in results if r["baseline"]), None)
    counted = any("instructions" in r for r in results)
    rows = []
    for r in results:
        errors = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
        rows.append([
            r["name"], f"{r['rps']:,.0f}", common.ratio(r["rps"], base["rps"]) if base else "n/a",
            f"{r['p50_us'] / 1000:.2f}", f"{r['p99_us'] / 1000:.2f}", f"{r['p99_us'] / max(r['p50_us'], 1):.1f}x",
            f"{r['answer_status']} ({r['answer_bytes']} B)", errors, "yes" if r["pinned"] else "no (all cores)", r["loadavg"],
            f"{r['cpu_us']:.1f}",
        ] + ([f"{r['instructions'] / 1000:,.0f}k" if "instructions" in r else ""] if counted else []))
    lines = [
        f"wrk, 1 thread, {args.connections} keep-alive connections, {args.duration:g} s per row and round after a {args.warmup:g} s "
        f"warm-up, best of {args.rounds} interleaved rounds per row, POSTing a {body_len}-byte OpenRTB 2.5 request (single 300x250 imp, floor 0.05) to {BID_PATH}; "
        f"non-TAFE servers serve `{args.app}`. {pinning.capitalize()}, except rows marked otherwise.",
        "",
        common.table(["server", "req/s", "vs gunicorn gevent", "p50 ms", "p99 ms", "p99/p50", "answer", "errors", "pinned", "load avg",
                      "CPU us/req"] + (["instructions/req (callgrind)"] if counted else []), rows),
    ]
    lines += ["", "The Nginx rows answer a fixed body without any backend: the most this machine passes through Nginx "
                  "to one wrk thread (wrk's own core bounds them too). Closed loop: p99 here is a queue of 64 connections, "
                  "not a tail at a fixed rate (see the threads-vs-greenlets section for that). CPU us/req: user + system CPU "
                  "of the server's session (it and all its children) over the measured run (kernel TCP work included; Nginx and its workers "
                  "too in the Nginx rows) divided by the requests answered: it moves less with the machine's load than req/s."]
    tafe = next((r for r in results if r["name"].startswith("TAFE, 1 worker")), None)
    if tafe and base:
        x = tafe["rps"] / base["rps"]
        tail = tafe["p99_us"] / max(tafe["p50_us"], 1)
        # The two rows run back to back in each round: their ratio within a round is the
        # least disturbed comparison, and the lowest one is what the goals are judged on.
        paired = [t / g for t, g in zip(per_round.get(tafe["name"], []), per_round.get(base["name"], []))]
        low = min(paired, default=x)
        lines += [
            "",
            f"Goals, one worker direct vs `gunicorn -k gevent`: {x:.2f}x req/s (best rounds) with p99 = {tail:.1f}x p50; "
            f"per round: {' '.join(f'{p:.2f}x' for p in paired)} (lowest {low:.2f}x). "
            f"Issue 6 (>= 1.0x): {'met' if low >= 1.0 else 'NOT met'}; "
            f"issue 2 (>= 2x in every round and p99 <= 3x p50): {'met' if low >= 2.0 and tail <= 3.0 else 'NOT met'}.",
        ]
    if tafe:
        lines += _against_c_and_rust(tafe, results, per_round)
    if counted:
        lines += ["", "Instructions per request: the server under `valgrind --tool=callgrind` (user-space code only, not the "
                      "kernel), 16 keep-alive connections from a client outside valgrind, counted over "
                      f"{args.instructions:,} requests after 500 (benchmarks/throughput/instructions.py). They do not drift "
                      "with the machine's load as the rates do."]
    lines += ["", "Machine:", "", "```", common.format_machine(info), "```", "", "Command:", "", "```", command, "```"]
    lines += ["", "Servers and load as started:", "", "```"]
    for r in results:
        lines += [r["server"], "  " + r["command"]]
    lines += ["```"]
    return "\n".join(lines)


def _against_c_and_rust(tafe: dict, results: list[dict], per_round: dict[str, list[float]]) -> list[str]:
    """Issue 16's goals: TAFE >= 1.0x bjoern and >= 1.15x granian in every round; p99 <= 3x p50."""
    out = []
    tail = tafe["p99_us"] / max(tafe["p50_us"], 1)
    for prefix, goal in (("bjoern", 1.0), ("granian", 1.15), ("meinheld", None), (UNBATCHED, None)):
        other = next((r for r in results if r["name"].startswith(prefix)), None)
        if other is None:
            out.append(f"{prefix}: no row (not chosen, or not installed here).")
            continue
        paired = [t / o for t, o in zip(per_round.get(tafe["name"], []), per_round.get(other["name"], []))]
        verdict = "" if goal is None else f" Goal >= {goal:.2f}x in every round: {'met' if min(paired, default=0) >= goal else 'NOT met'}."
        out.append(f"TAFE / {prefix} per round: {' '.join(f'{p:.2f}x' for p in paired)} (best rows "
                   f"{tafe['rps'] / other['rps']:.2f}x; CPU per request, TAFE / {prefix}: {tafe['cpu_us'] / other['cpu_us']:.2f}x)."
                   f"{verdict}")
    out.append(f"TAFE p99 = {tail:.1f}x p50 at 64 connections (goal <= 3x: {'met' if tail <= 3.0 else 'NOT met'}).")
    if "instructions" in tafe:
        bjoern = next((r for r in results if r["name"].startswith("bjoern") and "instructions" in r), None)
        if bjoern is not None:
            out.append(f"Instructions per request: TAFE {tafe['instructions']:,.0f}, bjoern {bjoern['instructions']:,.0f} "
                       f"(TAFE / bjoern {tafe['instructions'] / bjoern['instructions']:.2f}x).")
    return ["", "Against the C and Rust servers (issue 16), each ratio within one round, rows back to back:", ""] + [
        f"- {line}" for line in out]


if __name__ == "__main__":
    sys.exit(main())
