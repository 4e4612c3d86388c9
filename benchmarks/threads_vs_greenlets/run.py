"""Threads vs greenlets: one I/O-bound bid handler, four servers, the same open-loop load.

    python benchmarks/threads_vs_greenlets/run.py [--rate R ...] [--duration 20] [--record]

Every server runs ``handler.py`` (parse, wait ~5 ms on a user-data service on loopback,
score) in ONE process: (a) TAFE's gevent server, (b) Apache 2 + mod_wsgi in threaded
daemon mode, (c) ``gunicorn -k gthread``, (d) ``gunicorn -k gevent``. Each gets the same
offered rate from ``openloop.py`` (requests leave on a fixed schedule; latency counts from
the intended send time) for the same time, at each rate of a small sweep. Prints p50/p90/p99/p99.9/max per server and
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


def measure(name: str, cmd: list[str], port: int, rate: float, args: argparse.Namespace, env: dict, cpus: list[int], log: Path) -> dict:
    """One round: start the server, check it bids, offer the load, stop it."""
    proc = common.start(cmd, log, env=env, cpus=cpus)
    try:
        common.wait_port(port, proc=proc)
        request = openloop.http_post("/openrtb2/bid", traffic.sample_body())
        probe = openloop.run(port, request, rate=50, duration_s=1.0, warmup_s=0.0, connections=4)
        if probe.statuses.get(200, 0) == 0:
            raise RuntimeError(f"{name} does not bid: {probe.statuses} {probe.errors}; see {log}")
        cpu0 = common.group_cpu_seconds(proc.pid)
        result = openloop.run(port, request, rate, args.duration / args.rounds, warmup_s=args.warmup, connections=args.connections)
        cpu = common.group_cpu_seconds(proc.pid) - cpu0
    finally:
        common.stop(proc)
    return {"result": result, "loadavg": os.getloadavg()[0], "cpu_s": cpu}


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
        # CPU per request barely depends on what else runs: the steadiest figure on a busy machine
        "cpu_us": 1e6 * sum(r["cpu_s"] for r in rounds) / max(1, sum(r["result"].sent for r in rounds)),
        "latencies_ms": latencies,
    }


def chart(by_rate: dict[float, list[dict]], path: Path, title: str) -> str:
    """Latency by percentile, one panel per rate, one curve per server (the tail stretched out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no chart: matplotlib is not installed; pip install -e '.[bench]')"
    import math

    fig, axes = plt.subplots(1, len(by_rate), figsize=(5.2 * len(by_rate), 5.2), dpi=100, sharey=True, squeeze=False)
    for ax, (rate, results) in zip(axes[0], by_rate.items()):
        for r in results:
            data = sorted(r["latencies_ms"])
            n = len(data)
            if n:
                xs = [-math.log10(1 - (i + 0.5) / n) for i in range(n)]
                ax.plot(xs, data, label=f"{r['name']}: p99 {r['p99']:.1f} ms", linewidth=1.5)
        ax.set_xticks([0, 1, 2, 3, 4], ["0%", "90%", "99%", "99.9%", "99.99%"])
        ax.set_xlim(0, 4)
        ax.set_yscale("log")
        ax.set_xlabel("percentile")
        ax.set_title(f"{rate:g} req/s offered", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
    axes[0][0].set_ylabel("latency from intended send time (ms, log scale)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"chart: {path}"


def run_rate(rate: float, chosen: dict[str, list[str]], port: int, args: argparse.Namespace, env: dict,
             server_cpus: list[int], out: Path) -> list[dict]:
    """All chosen servers at one offered rate, in interleaved rounds."""
    rounds: dict[str, list[dict]] = {}
    # Rounds interleave the servers so that a burst of outside load hits them all alike.
    for rnd in range(args.rounds):
        for name, cmd in chosen.items():
            log = out / (name.split()[0].lower() + ".log")
            try:
                r = measure(name, cmd, port, rate, args, env, server_cpus, log)
            except RuntimeError as exc:
                print(f"  {name}: FAILED: {exc}", flush=True)
                continue
            rounds.setdefault(name, []).append(r)
            s = common.summarize(r["result"].latencies_ms)
            print(f"  {rate:g} req/s, round {rnd + 1}/{args.rounds}, {name}: p50 {s['p50']:.2f} p99 {s['p99']:.2f} "
                  f"max {s['max']:.2f} ms, load avg {r['loadavg']:.1f}", flush=True)
            time.sleep(0.5)
    return [merge(name, shlex.join(common.pinned(chosen[name], server_cpus)), rs) for name, rs in rounds.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, action="append", help="offered requests/s, the same for every server "
                        "(repeat for a sweep; default 200, 400 and 600)")
    parser.add_argument("--duration", type=float, default=16.0, help="measured seconds per server and rate, split across the rounds")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each server once per round)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring, each round")
    parser.add_argument("--connections", type=int, default=64, help="client keep-alive connections")
    parser.add_argument("--threads", type=int, default=15, help="threads of the threaded servers (mod_wsgi's default)")
    parser.add_argument("--upstream-ms", type=float, default=5.0, help="user-data service delay")
    parser.add_argument("--only", action="append", help="run only servers whose name contains this (repeatable)")
    parser.add_argument("--chart", type=Path, default=CHART, help="where to draw the latency PNG")
    parser.add_argument("--record", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    rates = args.rate or [200.0, 400.0, 600.0]

    selected = lambda name: not args.only or any(o.lower() in name.lower() for o in args.only)  # noqa: E731
    missing = []
    if selected("Apache"):
        missing = common.ensure_debian({"apache2": "apache2", str(MOD_DIR / "mod_wsgi.so"): "libapache2-mod-wsgi-py3"})
    server_cpus, load_cpus, pinning = common.split_cores()
    info = common.machine_info(["apache2", "debian python3", "gunicorn", "locust"])
    out = common.OUT_DIR / "threads_vs_greenlets"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.log"):
        old.unlink()
    upstream_port, port = common.free_port(), common.free_port()
    env = {"TVG_UPSTREAM": f"127.0.0.1:{upstream_port}", "PYTHONUNBUFFERED": "1"}
    command = "python benchmarks/threads_vs_greenlets/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"threads vs greenlets: {', '.join(f'{r:g}' for r in rates)} req/s offered open-loop, {args.duration:g} s per server "
          f"and rate in {args.rounds} rounds, {args.connections} connections, upstream {args.upstream_ms:g} ms, one server "
          f"process each\n{pinning}\n{common.format_machine(info)}", flush=True)
    upstream = common.start(
        [sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port), "--delay-ms", str(args.upstream_ms)],
        out / "upstream.log",
        cpus=load_cpus,
    )
    by_rate: dict[float, list[dict]] = {}
    try:
        common.wait_port(upstream_port, proc=upstream)
        with tempfile.TemporaryDirectory(prefix="tafe-tvg-") as tmp:
            chosen = {n: c for n, c in servers(port, args.threads, Path(tmp)).items() if selected(n)}
            for n, c in list(chosen.items()):
                if c[0] == "apache2" and missing:
                    print(f"  skipped {n}: missing {missing}", flush=True)
                    del chosen[n]
            for rate in rates:
                results = run_rate(rate, chosen, port, args, env, server_cpus, out)
                if results:
                    by_rate[rate] = results
    finally:
        common.stop(upstream)
    if not by_rate:
        return 1
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in by_rate.items()}))
    report = render(by_rate, args, info, pinning, command)
    title = f"One process per server; bid handler waits {args.upstream_ms:g} ms on an upstream, then scores; open-loop load"
    report += "\n\n" + chart(by_rate, args.chart, title)
    print("\n" + report)
    if args.record:
        link = f"![latency by percentile]({os.path.relpath(args.chart, common.BENCH_DIR)})"
        common.record(SECTION, "## Threads vs greenlets (I/O-bound bid handler, open loop)\n\n" + report.replace(f"chart: {args.chart}", link))
    return 0


def render(by_rate: dict[float, list[dict]], args: argparse.Namespace, info: dict, pinning: str, command: str) -> str:
    lines = [
        f"Open-loop load (requests leave on a fixed schedule; latency counts from the intended send time), "
        f"{args.duration:g} s measured per server and rate in {args.rounds} interleaved rounds, each after a "
        f"{args.warmup:g} s warm-up; {args.connections} keep-alive connections. The handler waits {args.upstream_ms:g} ms "
        f"on a loopback user-data service, then scores; one server process each; threaded servers have {args.threads} "
        f"threads. {pinning.capitalize()}.",
    ]
    goals = []
    for rate, results in by_rate.items():
        base = next((r for r in results if r["name"].startswith("TAFE")), results[0])
        rows = [
            [r["name"], *(f"{r[k]:.2f}" for k in ("p50", "p90", "p99", "p99.9", "max")), common.ratio(r["p99"], base["p99"]),
             f"{r['cpu_us']:.0f}", r["achieved_rps"], r["failed"], r["client_lag_ms"], r["loadavg"]]
            for r in results
        ]
        headers = ["server", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "p99 vs TAFE", "CPU us/req", "req/s", "failed", "client lag ms", "load avg"]
        lines += ["", f"### {rate:g} requests/s offered", "", common.table(headers, rows)]
        apache_r = next((r for r in results if r["name"].startswith("Apache")), None)
        if apache_r and base["name"].startswith("TAFE"):
            goals.append((rate, base["p99"] / apache_r["p99"], base["p99"]))
    lines += ["", "CPU us/req: CPU time of the server's processes (all of them, e.g. Apache's and mod_wsgi's) per request, "
                  "warm-up included. client lag: the longest the load generator itself was late releasing a request "
                  "(counted in the latencies). load avg: the 1-minute load average after each round; above the core count, "
                  "other work competed for the cores."]
    if goals:
        lines += ["", "Goal: TAFE p99 <= 0.25x Apache/mod_wsgi's p99 at a rate where TAFE's p99 < 20 ms."]
        for rate, share, p99 in goals:
            verdict = "met" if share <= 0.25 and p99 < 20 else ("NOT met" if p99 < 20 else "not judged: TAFE p99 >= 20 ms")
            lines.append(f"- {rate:g} req/s: TAFE p99 {p99:.1f} ms = {share:.2f}x Apache's: {verdict}.")
    lines += ["", "Machine:", "", "```", common.format_machine(info), "```", "", "Command:", "", "```", command, "```"]
    first = next(iter(by_rate.values()))
    lines += ["", "Servers as started:", "", "```", *(r["command"] for r in first), "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
