"""Threads vs greenlets: one I/O-bound bid handler, four servers, the same open-loop load.

    python benchmarks/threads_vs_greenlets/run.py [--rate R ...] [--arrivals poisson|fixed]
        [--upstream-median-ms 3 --upstream-sigma 0.5 | --upstream-ms 5] [--duration 12] [--record]

Every server runs ``handler.py`` (parse, look the user up on a user-data service on
loopback, score) in ONE process: (a) TAFE's gevent server, (b) Apache 2 + mod_wsgi in
threaded daemon mode with mod_wsgi's default 15 threads, (c) ``gunicorn -k gthread``
with as many, (d) ``gunicorn -k gevent``. Each gets the same offered load from
``openloop.py`` at each rate of a sweep, from light load to beyond the rate where 15
threads in one process fall behind on this machine (the default rates). The load is
what an exchange sends, not a metronome: Poisson arrivals (seeded, the same sequence for
every server; ``--arrivals fixed`` for evenly spaced ones), latency counted from each
request's intended send time, and user lookups with a long tail (``upstream.py``: a
lognormal time, median 3 ms, p99 ~9.6 ms, picked by a hash of the user id, so every
server waits the same time for the same request; ``--upstream-ms`` for a constant one).
Prints p50/p90/p99/p99.9/max per server, the lookup's own percentiles beside them (the
floor no server can beat), the ratios to TAFE and a goal line per rate; draws the
latency distributions (``latency.png``); with ``--record`` replaces this benchmark's
section of ``benchmarks/RESULTS.md``. A rate a server cannot keep up with stays in the
table, with its answered req/s and its failures.

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
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402
import openloop  # noqa: E402  (monkey-patches: imported before anything opens sockets)
import traffic  # noqa: E402
import upstream  # noqa: E402

SECTION = "threads-vs-greenlets"
RATES = [300.0, 700.0, 1100.0, 1500.0, 1800.0]  # light load to beyond where one Apache process falls behind here (~1400)
USERS = 8192
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


def serve(name: str, cmd: list[str], port: int, rates: list[float], rnd: int, requests: list[bytes],
          args: argparse.Namespace, env: dict, cpus: list[int], log: Path, machine: Machine) -> dict[float, dict]:
    """One round of one server: start it, check it bids, offer each rate in turn (lowest first), stop it.

    The machine is shared: a rate during which other work took more than ``--max-other`` %
    of the cores (the server's and the load generator's) is offered again (twice at most,
    within the machine's re-run budget); the least disturbed try is kept, with that share.
    """
    proc = common.start(cmd, log, env=env, cpus=cpus)
    out: dict[float, dict] = {}
    try:
        common.wait_port(port, proc=proc)
        probe = openloop.run(port, requests, rate=50, duration_s=0.5, warmup_s=0.0, connections=4, arrivals="fixed")
        if probe.statuses.get(200, 0) == 0:
            raise RuntimeError(f"{name} does not bid: {probe.statuses} {probe.errors}; see {log}")
        for rate in rates:
            for attempt in range(3):
                cpu0, other0, t0 = common.group_cpu_seconds(proc.pid), machine.other_busy_s(proc.pid), time.monotonic()
                result = openloop.run(port, requests, rate, args.duration / args.rounds, warmup_s=args.warmup,
                                      connections=args.connections, arrivals=args.arrivals, seed=rnd)
                cpu = common.group_cpu_seconds(proc.pid) - cpu0
                other = 100 * max(0.0, machine.other_busy_s(proc.pid) - other0) / ((time.monotonic() - t0) * len(machine.cpus))
                if attempt == 0 or other < out[rate]["other_pct"]:  # the least disturbed try is kept
                    out[rate] = {"result": result, "loadavg": os.getloadavg()[0], "cpu_s": cpu, "other_pct": other}
                out[rate]["reruns"] = attempt
                s = common.summarize(result.latencies_ms)
                print(f"  round {rnd + 1}/{args.rounds}, {rate:g} req/s, {name}: p50 {s['p50']:.2f} p99 {s['p99']:.2f} "
                      f"max {s['max']:.2f} ms, {result.achieved_rps:.0f} req/s answered, other work {other:.0f}% of the "
                      f"cores, load avg {os.getloadavg()[0]:.1f}", flush=True)
                time.sleep(0.3)
                if other <= args.max_other or attempt == 2 or machine.reruns_left <= 0:
                    break
                machine.reruns_left -= 1
                print("    disturbed by other work: offered again", flush=True)
    finally:
        common.stop(proc)
    return out


@dataclass
class Machine:
    """What else runs here: the benchmark's cores, its helpers (the upstream) and a bounded re-run budget."""

    cpus: list[int]
    helpers: list[int]
    reruns_left: int

    def other_busy_s(self, server_pid: int) -> float:
        """Busy seconds of the cores (interrupts and steal included) not spent by the server, helpers or client."""
        busy = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                busy += sum(map(int, fields[:8])) - int(fields[3]) - int(fields[4])
        ours = sum(common.group_cpu_seconds(pid) for pid in (server_pid, *self.helpers)) + sum(os.times()[:2])
        return busy / os.sysconf("SC_CLK_TCK") - ours


def merge(name: str, command: str, tries: list[dict], max_other: float) -> dict:
    """Pool the rounds of one server: one latency distribution, summed counts.

    Rounds during which other work took more than ``max_other`` % of the cores are
    left out when a quieter round exists (the table says which): they measure the machine.
    """
    quiet = any(r["other_pct"] <= max_other for r in tries)
    left_out = lambda r: quiet and r["other_pct"] > max_other  # noqa: E731
    rounds = [r for r in tries if not left_out(r)]
    latencies = [x for r in rounds for x in r["result"].latencies_ms]
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    for r in rounds:
        for k, v in r["result"].statuses.items():
            statuses[k] = statuses.get(k, 0) + v
        for k, v in r["result"].errors.items():
            errors[k] = errors.get(k, 0) + v
    ok = sum(n for s, n in statuses.items() if s in (200, 204))
    errors.update({f"HTTP {s}": n for s, n in statuses.items() if s not in (0, 200, 204)})
    seconds = sum(r["result"].duration_s for r in rounds)
    achieved = len(latencies) / seconds if seconds else 0.0
    return {
        "name": name,
        "command": command,
        **common.summarize(latencies),
        "ok": ok,
        "offered": sum(r["result"].offered for r in rounds),
        "failed": sum(r["result"].offered for r in rounds) - ok,
        "errors": errors,
        "achieved_rps": round(achieved, 1),
        # Little's law: requests inside the server (or queued for a connection) on average
        "in_flight": round(achieved * sum(latencies) / len(latencies) / 1000, 1) if latencies else 0.0,
        "client_lag_ms": round(max(r["result"].max_dispatch_lag_ms for r in rounds), 2),
        "loadavg": " ".join(f"{r['loadavg']:.1f}" for r in tries),
        "other_pct": " ".join(f"{r['other_pct']:.0f}" + ("*" if left_out(r) else "") for r in tries),
        "reruns": sum(r["reruns"] for r in tries),
        # CPU per request barely depends on what else runs: the steadiest figure on a busy machine
        "cpu_us": 1e6 * sum(r["cpu_s"] for r in rounds) / max(1, sum(r["result"].sent for r in rounds)),
        "latencies_ms": latencies,
    }


def upstream_delays(rate: float, args: argparse.Namespace, users: list[str]) -> list[float]:
    """The lookup times the upstream was asked for during the measured seconds (the same for every server)."""
    out = []
    for rnd in range(args.rounds):
        times = openloop.schedule(rate, args.warmup + args.duration / args.rounds, args.arrivals, seed=rnd)
        out += [upstream.delay_ms(users[i % len(users)], args.upstream_median_ms, args.upstream_sigma)
                for i, t in enumerate(times) if t >= args.warmup]
    return out


def chart(by_rate: dict[float, list[dict]], delays: dict[float, list[float]], path: Path, title: str) -> str:
    """Latency by percentile, one panel per rate, one curve per server (the tail stretched out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no chart: matplotlib is not installed; pip install -e '.[bench]')"
    import math

    cols = min(3, len(by_rate))
    rows = math.ceil(len(by_rate) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.8 * rows), dpi=100, sharey=True, squeeze=False)
    for ax, (rate, results) in zip(axes.flat, by_rate.items()):
        curves = [(f"{r['name']}: p99 {r['p99']:.1f} ms", r["latencies_ms"], {}) for r in results]
        up = common.summarize(delays[rate])
        curves.append((f"upstream lookup alone: p99 {up['p99']:.1f} ms", delays[rate], {"color": "grey", "linestyle": "--"}))
        for label, values, style in curves:
            data = sorted(values)
            n = len(data)
            if n:
                xs = [-math.log10(1 - (i + 0.5) / n) for i in range(n)]
                ax.plot(xs, data, label=label, linewidth=1.5, **style)
        ax.set_xticks([0, 1, 2, 3, 4], ["0%", "90%", "99%", "99.9%", "99.99%"])
        ax.set_xlim(0, 4)
        ax.set_yscale("log")
        ax.set_xlabel("percentile")
        ax.set_title(f"{rate:g} req/s offered", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.flat[len(by_rate):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel("latency from intended send time (ms, log)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return f"chart: {path}"


def run_all(rates: list[float], chosen: dict[str, list[str]], port: int, requests: list[bytes], args: argparse.Namespace,
            env: dict, server_cpus: list[int], out: Path, machine: Machine) -> dict[float, list[dict]]:
    """Every chosen server at every rate, in interleaved rounds; pooled per server and rate."""
    rounds: dict[tuple[str, float], list[dict]] = {}
    # Rounds interleave the servers so that a burst of outside load hits them all alike.
    for rnd in range(args.rounds):
        for name, cmd in chosen.items():
            log = out / (name.split()[0].lower() + ".log")
            try:
                for rate, r in serve(name, cmd, port, rates, rnd, requests, args, env, server_cpus, log, machine).items():
                    rounds.setdefault((name, rate), []).append(r)
            except RuntimeError as exc:
                print(f"  {name}: FAILED: {exc}", flush=True)
    return {
        rate: [merge(name, shlex.join(common.pinned(cmd, server_cpus)), rounds[name, rate], args.max_other) for name, cmd in chosen.items()
               if (name, rate) in rounds]
        for rate in rates
    }


def bid_requests(users: list[str]) -> list[bytes]:
    """The same ~1.5 KB bid request once per user: request i carries users[i % len(users)]."""
    body = traffic.sample_body()
    uid = json.loads(body)["user"]["buyeruid"].encode()
    return [openloop.http_post("/openrtb2/bid", body.replace(uid, u.encode())) for u in users]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, action="append", help="offered requests/s, the same for every server "
                        f"(repeat for a sweep; default {', '.join(map(str, RATES))})")
    parser.add_argument("--arrivals", choices=openloop.ARRIVALS, default="poisson",
                        help="poisson: seeded exponential gaps (default); fixed: one request every 1/rate s")
    parser.add_argument("--duration", type=float, default=12.0, help="measured seconds per server and rate, split across the rounds")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each server once per round)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring, each rate and round")
    parser.add_argument("--connections", type=int, default=64, help="client keep-alive connections")
    parser.add_argument("--threads", type=int, default=15, help="threads of the threaded servers (mod_wsgi's default)")
    parser.add_argument("--upstream-median-ms", type=float, default=upstream.MEDIAN_MS, help="median user lookup time")
    parser.add_argument("--upstream-sigma", type=float, default=upstream.SIGMA, help="lognormal shape of the lookup time")
    parser.add_argument("--upstream-ms", type=float, help="constant lookup time instead (sets the median, sigma 0)")
    parser.add_argument("--max-other", type=float, default=10.0, help="offer a rate again when other work took more "
                        "than this %% of the cores meanwhile")
    parser.add_argument("--reruns", type=int, default=6, help="at most this many such re-runs in all (bounds the time)")
    parser.add_argument("--only", action="append", help="run only servers whose name contains this (repeatable)")
    parser.add_argument("--chart", type=Path, default=CHART, help="where to draw the latency PNG")
    parser.add_argument("--record", action="store_true", help="replace this section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.upstream_ms is not None:
        args.upstream_median_ms, args.upstream_sigma = args.upstream_ms, 0.0
    rates = sorted(args.rate or RATES)

    selected = lambda name: not args.only or any(o.lower() in name.lower() for o in args.only)  # noqa: E731
    missing = []
    if selected("Apache"):
        missing = common.ensure_debian({"apache2": "apache2", str(MOD_DIR / "mod_wsgi.so"): "libapache2-mod-wsgi-py3"})
    server_cpus, load_cpus, pinning = common.split_cores()
    all_cpus = sorted({*server_cpus, *load_cpus})
    os.sched_setaffinity(0, load_cpus)  # this process is the load generator
    info = common.machine_info(["apache2", "debian python3", "gunicorn", "locust"])
    out = common.OUT_DIR / "threads_vs_greenlets"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.log"):
        old.unlink()
    upstream_port, port = common.free_port(), common.free_port()
    env = {"TVG_UPSTREAM": f"127.0.0.1:{upstream_port}", "PYTHONUNBUFFERED": "1"}
    command = "python benchmarks/threads_vs_greenlets/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    users = [f"u{i:07d}" for i in range(USERS)]
    print(f"threads vs greenlets: {', '.join(f'{r:g}' for r in rates)} req/s offered open-loop ({args.arrivals} arrivals), "
          f"{args.duration:g} s per server and rate in {args.rounds} rounds, {args.connections} connections, "
          f"{lookup_text(args)}, one server process each\n{pinning}\n{common.format_machine(info)}", flush=True)
    upstream_cmd = [sys.executable, str(HERE / "upstream.py"), "--port", str(upstream_port),
                    "--median-ms", str(args.upstream_median_ms), "--sigma", str(args.upstream_sigma)]
    up = common.start(upstream_cmd, out / "upstream.log", cpus=load_cpus)
    try:
        common.wait_port(upstream_port, proc=up)
        with tempfile.TemporaryDirectory(prefix="tafe-tvg-") as tmp:
            chosen = {n: c for n, c in servers(port, args.threads, Path(tmp)).items() if selected(n)}
            for n, c in list(chosen.items()):
                if c[0] == "apache2" and missing:
                    print(f"  skipped {n}: missing {missing}", flush=True)
                    del chosen[n]
            by_rate = {r: v for r, v in run_all(rates, chosen, port, bid_requests(users), args, env, server_cpus, out,
                                                    Machine(all_cpus, [up.pid], args.reruns)).items() if v}
    finally:
        common.stop(up)
    if not by_rate:
        return 1
    delays = {rate: upstream_delays(rate, args, users) for rate in by_rate}
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in by_rate.items()}))
    report = render(by_rate, delays, args, info, pinning, command)
    title = f"One process per server; the handler waits on a {lookup_text(args)}, then scores; open loop, {args.arrivals} arrivals"
    report += "\n\n" + chart(by_rate, delays, args.chart, title)
    print("\n" + report)
    if args.record:
        link = f"![latency by percentile]({os.path.relpath(args.chart, common.BENCH_DIR)})"
        common.record(SECTION, "## Threads vs greenlets (I/O-bound bid handler, open loop)\n\n" + report.replace(f"chart: {args.chart}", link))
    return 0


def lookup_text(args: argparse.Namespace) -> str:
    if args.upstream_sigma <= 0:
        return f"constant {args.upstream_median_ms:g} ms lookup"
    return f"lognormal lookup (median {args.upstream_median_ms:g} ms, sigma {args.upstream_sigma:g})"


def render(by_rate: dict[float, list[dict]], delays: dict[float, list[float]], args: argparse.Namespace, info: dict,
           pinning: str, command: str) -> str:
    arrivals = ("Poisson arrivals (seeded exponential gaps, the same sequence for every server: exchange traffic is the sum "
                "of many independent users)" if args.arrivals == "poisson" else "fixed-interval arrivals (one request every 1/rate s)")
    lookup = (f"a constant {args.upstream_median_ms:g} ms" if args.upstream_sigma <= 0 else
              f"a lognormal time (median {args.upstream_median_ms:g} ms, sigma {args.upstream_sigma:g}: most lookups are "
              f"fast, a few are slow, like a user store's cache hits and misses) picked by a hash of the user id")
    lines = [
        f"Open-loop load: {arrivals}; latency counts from each request's intended send time. {args.duration:g} s measured "
        f"per server and rate in {args.rounds} interleaved rounds (each server is started once per round and offered the "
        f"rates in rising order, each after a {args.warmup:g} s warm-up); {args.connections} keep-alive connections. "
        f"Each request carries one of {USERS} user ids; the handler looks the user up on a loopback user-data service, "
        f"which answers after {lookup}, so every server waits the same times for the same requests (the 'upstream "
        f"lookup' row: a floor no server can beat). One server process each; the threaded servers have {args.threads} "
        f"threads, mod_wsgi's daemon-mode default (Apache's event MPM front has 128 threads to accept and relay "
        f"connections). The rates run from light load to beyond the rate where one such Apache process falls behind "
        f"on this machine, and every rate is shown, met or not. {pinning.capitalize()}.",
    ]
    goals = []
    headers = ["server", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "p99 vs TAFE", "CPU us/req", "core %",
               "req/s", "in flight", "failed", "client lag ms", "other work %", "load avg"]
    for rate, results in by_rate.items():
        base = next((r for r in results if r["name"].startswith("TAFE")), results[0])
        rows = [
            [r["name"], *(f"{r[k]:.2f}" for k in ("p50", "p90", "p99", "p99.9", "max")), common.ratio(r["p99"], base["p99"]),
             f"{r['cpu_us']:.0f}", f"{r['cpu_us'] * rate / 1e4:.0f}", r["achieved_rps"], r["in_flight"], failures(r), r["client_lag_ms"],
             r["other_pct"] + (f" ({r['reruns']} re-run)" if r["reruns"] else ""), r["loadavg"]]
            for r in results
        ]
        up = common.summarize(delays[rate])
        rows.append(["upstream lookup (all servers)", *(f"{up[k]:.2f}" for k in ("p50", "p90", "p99", "p99.9", "max")),
                     *["-"] * 9])
        lines += ["", f"### {rate:g} requests/s offered", "", common.table(headers, rows)]
        apache_r = next((r for r in results if r["name"].startswith("Apache")), None)
        if apache_r and base["name"].startswith("TAFE"):
            goals.append((rate, base, apache_r))
    lines += ["", "CPU us/req: CPU time of the server's processes (all of them, e.g. Apache's and mod_wsgi's) per request, "
                  "warm-up included; core %: that times the offered rate, how busy the server's one core was. req/s: "
                  "answers per measured second. in flight: requests inside the server or waiting for a connection, on "
                  "average (answered req/s x mean latency, Little's law); a threaded server with more in flight than its "
                  f"{args.threads} threads is queueing. failed: not a 200/204, or no answer within 5 s after the last request was due. "
                  "client lag: the longest the load generator itself was late releasing a request (counted in the "
                  "latencies). other work %: the share of the cores (the server's and the load generator's) that "
                  f"other processes and interrupts took during each round's measurement; a rate where it passed {args.max_other:g}% was offered again, up to "
                  f"twice ({args.reruns} re-runs in all at most), and the least disturbed try kept; a round still above "
                  f"{args.max_other:g}% (marked *) is left out of the numbers when another round of that server and rate "
                  "was quieter. load avg: the 1-minute load "
                  "average after each round."]
    if goals:
        lines += ["", "Goal: TAFE p99 <= 0.25x Apache/mod_wsgi's p99 at the same offered rate, at a rate where TAFE's p99 < 20 ms."]
        for rate, tafe, apache in goals:
            share = tafe["p99"] / apache["p99"]
            under = tafe["p99"] < 20
            verdict = "met" if share <= 0.25 and under else "NOT met"
            kept_up = "" if not apache["failed"] else f"; Apache left {failures(apache)} of {apache['offered']} requests unanswered"
            lines.append(f"- {rate:g} req/s: TAFE p99 {tafe['p99']:.1f} ms ({'under' if under else 'NOT under'} 20 ms) = "
                         f"{share:.2f}x Apache's {apache['p99']:.1f} ms{kept_up}: {verdict}.")
    lines += ["", "Machine:", "", "```", common.format_machine(info), "```", "", "Command:", "", "```", command, "```"]
    first = next(iter(by_rate.values()))
    lines += ["", "Servers as started:", "", "```", *(r["command"] for r in first), "```"]
    return "\n".join(lines)


def failures(r: dict) -> str:
    """The failed count, with what went wrong when the client saw errors (timeouts, resets, never sent)."""
    reasons = dict(r["errors"])
    if r["failed"] > sum(reasons.values()):
        reasons["unanswered at the end"] = r["failed"] - sum(reasons.values())
    if not r["failed"]:
        return "0"
    return f"{r['failed']} ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))})"


if __name__ == "__main__":
    sys.exit(main())
