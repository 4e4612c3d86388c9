"""Threads vs greenlets: one I/O-bound bid handler, four servers, the same open-loop load.

    python benchmarks/threads_vs_greenlets/run.py [--rate 400] [--duration 20] [--record]

Every server runs ``handler.py`` (parse, wait ~5 ms on a user-data service on loopback,
score) in ONE process: (a) TAFE's gevent server, (b) Apache 2 + mod_wsgi in threaded
daemon mode, (c) ``gunicorn -k gthread``, (d) ``gunicorn -k gevent``. Each gets the same
offered rate from ``openloop.py`` (requests leave on a fixed schedule; latency counts from
the intended send time) for the same time. Prints p50/p90/p99/p99.9/max per server and
the ratios to TAFE, draws the latency distributions (``latency.png``), and with
``--record`` replaces this benchmark's section of ``benchmarks/RESULTS.md``.

Setup: installs ``apache2`` and ``libapache2-mod-wsgi-py3`` from Debian when missing (as
root). Apache runs as a foreground child with its own ServerRoot in a temporary
directory, never as the system service. mod_wsgi embeds Debian's /usr/bin/python3, which
is why the handler is stdlib only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import openloop  # noqa: E402  (monkey-patches: imported before anything opens sockets)

import common  # noqa: E402
import traffic  # noqa: E402

SECTION = "threads-vs-greenlets"
CHART = HERE / "latency.png"
MOD_DIR = Path("/usr/lib/apache2/modules")
APACHE_CONF = """\
ServerRoot "{root}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {root}/apache2.pid
ErrorLog {out}/apache-error.log
LogLevel warn
{user}
LoadModule mpm_event_module {mods}/mod_mpm_event.so
LoadModule authz_core_module {mods}/mod_authz_core.so
LoadModule wsgi_module {mods}/mod_wsgi.so
StartServers 1
ServerLimit 1
ThreadLimit 128
ThreadsPerChild 128
MaxRequestWorkers 128
ListenBacklog 2048
KeepAlive On
MaxKeepAliveRequests 0
KeepAliveTimeout 30
WSGISocketPrefix {root}/wsgi
WSGIDaemonProcess bench processes=1 threads={threads} python-path={root} listen-backlog=2048
WSGIProcessGroup bench
WSGIApplicationGroup %{{GLOBAL}}
WSGIScriptAlias / {root}/handler.py
WSGIImportScript {root}/handler.py process-group=bench application-group=%{{GLOBAL}}
<Directory />
    AllowOverride None
</Directory>
<Directory {root}>
    Require all granted
</Directory>
"""


def apache(port: int, threads: int, root: Path) -> list[str]:
    """Write a self-contained Apache config under ``root``; return the foreground command."""
    root.mkdir(parents=True, exist_ok=True)
    for d in (root.parent, root):
        d.chmod(0o755)  # the daemon process runs as an unprivileged user when we are root
    shutil.copy(HERE / "handler.py", root / "handler.py")
    user = "User nobody\nGroup nogroup" if os.geteuid() == 0 else ""
    conf = APACHE_CONF.format(root=root, out=common.OUT_DIR / "threads_vs_greenlets", port=port, user=user, mods=MOD_DIR, threads=threads)
    (root / "httpd.conf").write_text(conf)
    return ["apache2", "-d", str(root), "-f", str(root / "httpd.conf"), "-DFOREGROUND"]


def servers(port: int, threads: int, tmp: Path) -> dict[str, list[str]]:
    py = sys.executable
    gunicorn = [str(common.VENV_BIN / "gunicorn"), "--chdir", str(HERE), "-w", "1", "-b", f"127.0.0.1:{port}"]
    gunicorn += ["--keep-alive", "30", "--backlog", "2048", "--log-level", "warning"]
    return {
        "TAFE (gevent)": [py, str(HERE.parent / "throughput" / "serve.py"), "tafe", "handler:application", "--path", str(HERE), "--port", str(port)],
        f"Apache mod_wsgi ({threads} threads)": apache(port, threads, tmp / "apache"),
        f"gunicorn gthread ({threads} threads)": [*gunicorn, "-k", "gthread", "--threads", str(threads), "handler:application"],
        "gunicorn gevent": [*gunicorn, "-k", "gevent", "--worker-connections", "1000", "handler:application"],
    }


def measure(name: str, cmd: list[str], port: int, args: argparse.Namespace, env: dict, cpus: list[int], log: Path) -> dict:
    """One round: start the server, check it bids, offer the load, stop it."""
    proc = common.start(cmd, log, env=env, cpus=cpus)
    try:
        common.wait_port(port, proc=proc)
        request = openloop.http_post("/openrtb2/bid", traffic.sample_body())
        probe = openloop.run(port, request, rate=50, duration_s=1.0, warmup_s=0.0, connections=4)
        if probe.statuses.get(200, 0) == 0:
            raise RuntimeError(f"{name} does not bid: {probe.statuses} {probe.errors}; see {log}")
        result = openloop.run(port, request, args.rate, args.duration / args.rounds, warmup_s=args.warmup, connections=args.connections)
    finally:
        common.stop(proc)
    return {"result": result, "loadavg": os.getloadavg()[0]}


def merge(name: str, command: str, rounds: list[dict]) -> dict:
    """Pool the rounds of one server: one latency distribution, summed counts."""
    latencies = [x for r in rounds for x in r["result"].latencies_ms]
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    for r in rounds:
        for k, v in r["result"].statuses.items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["result"].errors.items():
            errors[k] = errors.get(k, 0) + v
    ok = sum(n for s, n in statuses.items() if s in (200, 204))
    seconds = sum(r["result"].duration_s for r in rounds)
    return {
        "name": name,
        "command": command,
        **common.summarize(latencies),
        "ok": ok,
        "failed": sum(statuses.values()) - ok + sum(errors.values()),
        "errors": errors,
        "achieved_rps": round(len(latencies) / seconds, 1) if seconds else 0.0,
        "client_lag_ms": round(max(r["result"].max_dispatch_lag_ms for r in rounds), 2),
        "loadavg": " ".join(f"{r['loadavg']:.1f}" for r in rounds),
        "latencies_ms": latencies,
    }


def chart(results: list[dict], path: Path, title: str) -> str:
    """Latency by percentile, one curve per server (HdrHistogram style: the tail stretched)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no chart: matplotlib is not installed; pip install -e '.[bench]')"
    import math

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for r in results:
        data = sorted(r["latencies_ms"])
        n = len(data)
        if not n:
            continue
        xs = [-math.log10(1 - (i + 0.5) / n) for i in range(n)]
        ax.plot(xs, data, label=f"{r['name']}: p99 {r['p99']:.1f} ms", linewidth=1.6)
    ticks = [0, 1, 2, 3, 4]
    ax.set_xticks(ticks, ["0%", "90%", "99%", "99.9%", "99.99%"])
    ax.set_xlim(0, 4)
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency from intended send time (ms, log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"chart: {path}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=400.0, help="offered requests/s, the same for every server")
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per server, split across the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each server once per round)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of load before measuring")
    parser.add_argument("--connections", type=int, default=64, help="client keep-alive connections")
    parser.add_argument("--threads", type=int, default=15, help="threads of the threaded servers (mod_wsgi's default)")
    parser.add_argument("--upstream-ms", type=float, default=5.0, help="user-data service delay")
    parser.add_argument("--only", action="append", help="run only servers whose name contains this (repeatable)")
    parser.add_argument("--chart", type=Path, default=CHART, help="where to draw the latency PNG")
    parser.add_argument("--record", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()

    selected = lambda name: not args.only or any(o.lower() in name.lower() for o in args.only)  # noqa: E731
    missing = []
    if selected("Apache"):
        missing = common.ensure_debian({"apache2": "apache2", str(MOD_DIR / "mod_wsgi.so"): "libapache2-mod-wsgi-py3"})
    server_cpus, load_cpus, pinning = common.split_cores()
    info = common.machine_info(["apache2", "debian python3", "gunicorn", "locust"])
    out = common.OUT_DIR / "threads_vs_greenlets"
    out.mkdir(parents=True, exist_ok=True)
    upstream_port, port = common.free_port(), common.free_port()
    env = {"TVG_UPSTREAM": f"127.0.0.1:{upstream_port}", "PYTHONUNBUFFERED": "1"}
    command = "python benchmarks/threads_vs_greenlets/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"threads vs greenlets: {args.rate:g} req/s offered open-loop, {args.duration:g} s per server in {args.rounds} rounds, "
          f"{args.connections} connections, upstream {args.upstream_ms:g} ms, one server process each\n{pinning}\n"
          f"{common.format_machine(info)}", flush=True)
    upstream = common.start(
        [sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port), "--delay-ms", str(args.upstream_ms)],
        out / "upstream.log",
        cpus=load_cpus,
    )
    rounds: dict[str, list[dict]] = {}
    commands: dict[str, str] = {}
    try:
        common.wait_port(upstream_port, proc=upstream)
        with tempfile.TemporaryDirectory(prefix="tafe-tvg-") as tmp:
            chosen = {n: c for n, c in servers(port, args.threads, Path(tmp)).items() if selected(n)}
            for n, c in list(chosen.items()):
                if c[0] == "apache2" and missing:
                    print(f"  skipped {n}: missing {missing}", flush=True)
                    del chosen[n]
            # Rounds interleave the servers so that a burst of outside load hits them all alike.
            for rnd in range(args.rounds):
                for name, cmd in chosen.items():
                    log = out / (name.split()[0].lower() + ".log")
                    if rnd == 0:
                        log.unlink(missing_ok=True)
                    commands[name] = shlex.join(common.pinned(cmd, server_cpus))
                    try:
                        r = measure(name, cmd, port, args, env, server_cpus, log)
                    except RuntimeError as exc:
                        print(f"  {name}: FAILED: {exc}", flush=True)
                        continue
                    rounds.setdefault(name, []).append(r)
                    s = common.summarize(r["result"].latencies_ms)
                    print(f"  round {rnd + 1}/{args.rounds} {name}: p50 {s['p50']:.2f} p99 {s['p99']:.2f} max {s['max']:.2f} ms, "
                          f"load avg {r['loadavg']:.1f}", flush=True)
                    time.sleep(0.5)
    finally:
        common.stop(upstream)
    results = [merge(name, commands[name], rs) for name, rs in rounds.items()]
    if not results:
        return 1
    (out / "results.json").write_text(json.dumps(results))
    report = render(results, args, info, pinning, command)
    report += "\n\n" + chart(results, args.chart, f"Bid handler waiting {args.upstream_ms:g} ms on an upstream, {args.rate:g} req/s open loop, one process each")
    print("\n" + report)
    if args.record:
        link = f"![latency by percentile]({os.path.relpath(args.chart, common.BENCH_DIR)})"
        common.record(SECTION, "## Threads vs greenlets (I/O-bound bid handler, open loop)\n\n" + report.replace(f"chart: {args.chart}", link))
    return 0


def render(results: list[dict], args: argparse.Namespace, info: dict, pinning: str, command: str) -> str:
    base = next((r for r in results if r["name"].startswith("TAFE")), results[0])
    rows = [
        [r["name"], *(f"{r[k]:.2f}" for k in ("p50", "p90", "p99", "p99.9", "max")), common.ratio(r["p99"], base["p99"]),
         r["achieved_rps"], r["failed"], r["client_lag_ms"], r["loadavg"]]
        for r in results
    ]
    lines = [
        f"Offered load: {args.rate:g} req/s open loop (latency from the intended send time), {args.duration:g} s measured "
        f"per server in {args.rounds} interleaved rounds, each after {args.warmup:g} s warm-up, {args.connections} keep-alive connections; handler waits {args.upstream_ms:g} ms "
        f"on a loopback user-data service, then scores; one server process each, threaded servers {args.threads} threads. "
        f"{pinning.capitalize()}.",
        "",
        common.table(["server", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "p99 vs TAFE", "req/s", "failed", "client lag ms", "load avg"], rows),
    ]
    lines += ["", "client lag: the longest the load generator itself was late releasing a request (counted in the latencies). "
                  "load avg: the 1-minute load average after each round; above the core count, other work competed."]
    apache_r = next((r for r in results if r["name"].startswith("Apache")), None)
    if apache_r and base["name"].startswith("TAFE"):
        share = base["p99"] / apache_r["p99"]
        verdict = "met" if share <= 0.25 and base["p99"] < 20 else "NOT met"
        lines += ["", f"Goal (TAFE p99 <= 0.25x Apache/mod_wsgi p99, TAFE p99 < 20 ms): TAFE p99 = {share:.2f}x Apache's, "
                      f"{base['p99']:.1f} ms: {verdict}."]
    lines += ["", "Machine:", "", "```", common.format_machine(info), "```", "", "Command:", "", "```", command, "```"]
    lines += ["", "Servers as started:", "", "```", *(r["command"] for r in results), "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
