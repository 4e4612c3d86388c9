"""Which JSON library should decode bid requests? Measured on the real OpenRTB fixtures.

For each file in ``../shared/openrtb/examples/*.json``: the time of one decode with
msgspec into TAFE's typed wire structs (what ``parse`` does: the type checks included,
unread fields skipped), and of one ``loads`` into plain Python objects with orjson,
ujson and the standard library's json (whose fields a Python reader must then check),
interleaved round by round in this one process (best of the rounds, so background
noise inflates none of them more than the others), then the ratios. A second table shows what the whole pure core costs per
request on the same fixtures (parse, decide with the demo campaigns and model, render),
which is what the choice is for.

    .venv/bin/python benchmarks/json_parse.py [--rounds 7] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson  # noqa: E402
import ujson  # noqa: E402
from common import ROOT, format_machine, machine_info, record, table  # noqa: E402

EXAMPLES = ROOT.parent / "shared" / "openrtb" / "examples"
CHOICE = (
    "Choice: **msgspec into typed structs** (`tafe/core/wire.py`). It checks the JSON types of the "
    "fields TAFE reads in C and skips the rest without building Python objects, so `parse` is left "
    "with required ids and merged locations (the core table below: what `parse` costs in all). orjson, the faster of the plain decoders (and the stricter: "
    "ujson accepts lone surrogates, NaN/Infinity and numbers that overflow a double), still encodes "
    "responses and names the fault of a body msgspec refuses (`not_utf8`, `too_deep`, `not_json`)."
)
# The decoder parse() uses (private there: only this comparison needs it by name).
from tafe.core.wire import _decode_request  # noqa: E402

LIBS = {"msgspec typed": _decode_request, "orjson": orjson.loads, "ujson": ujson.loads, "json": json.loads}


def per_call_us(fn, arg, budget_s: float = 0.02) -> float:
    """CPU microseconds per call, timing a batch sized to take about ``budget_s``.

    Process CPU time, not wall time: the 2 cores are shared with other work, and CPU
    time does not count the slices this process spent waiting for a core.
    """
    n, elapsed = 1, 0.0
    while elapsed < budget_s:
        n *= 2
        t0 = time.process_time()
        for _ in range(n):
            fn(arg)
        elapsed = time.process_time() - t0
    return elapsed / n * 1e6


def bench_json(files: list[Path], rounds: int) -> tuple[list[list[object]], dict[str, float]]:
    best = {(f.name, lib): float("inf") for f in files for lib in LIBS}
    bodies = {f.name: f.read_bytes() for f in files}
    for _ in range(rounds):
        for name, body in bodies.items():
            for lib, loads in LIBS.items():
                best[name, lib] = min(best[name, lib], per_call_us(loads, body))
    rows = []
    for name, body in bodies.items():
        m, o, u, j = (best[name, lib] for lib in LIBS)
        rows.append([name, len(body), f"{m:.2f}", f"{o:.2f}", f"{u:.2f}", f"{j:.2f}", f"{o / m:.2f}x", f"{u / o:.2f}x"])
    totals = {lib: sum(best[f.name, lib] for f in files) for lib in LIBS}
    return rows, totals


def bench_core(files: list[Path], rounds: int) -> list[list[object]]:
    from tafe.core.decide import Inputs, decide
    from tafe.core.render import render
    from tafe.core.request import parse
    from tafe.handlers import build
    from tafe.settings import Settings

    apps = build(Settings())
    snapshot, campaigns = apps.holder.current, apps.campaigns
    now = 1_700_000_000.0
    rows = []
    for f in files:
        body = f.read_bytes()
        request = parse(body)
        decision = decide(request, Inputs(snapshot, campaigns, now))
        stages = {
            "parse": (parse, body),
            "decide": (lambda r: decide(r, Inputs(snapshot, campaigns, now)), request),
            "render": (lambda d: render(d, seat="tafe", notice_base="http://127.0.0.1:8080"), decision),
        }
        times = {k: min(per_call_us(fn, arg) for _ in range(rounds)) for k, (fn, arg) in stages.items()}
        rows.append([f.name, len(request.imps), len(decision.bids), *(f"{t:.1f}" for t in times.values()), f"{sum(times.values()):.1f}"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--record", action="store_true", help="write the 'JSON parsing' section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    files = sorted(EXAMPLES.glob("*.json"))
    if not files:
        print(f"no fixtures in {EXAMPLES}", file=sys.stderr)
        return 1
    machine = format_machine(machine_info(["msgspec", "orjson", "ujson"]))
    rows, totals = bench_json(files, args.rounds)
    json_table = table(
        ["fixture", "bytes", "msgspec typed us", "orjson us", "ujson us", "json us", "orjson/msgspec", "ujson/orjson"], rows
    )
    ratios = [float(r[6][:-1]) for r in rows]
    summary = (
        f"all {len(files)} fixtures, one decode each: msgspec typed {totals['msgspec typed']:.1f} us, "
        f"orjson {totals['orjson']:.1f} us, ujson {totals['ujson']:.1f} us, json {totals['json']:.1f} us; "
        f"orjson/msgspec = {totals['orjson'] / totals['msgspec typed']:.2f}x in total, "
        f"median {median(ratios):.2f}x, range {min(ratios):.2f}x-{max(ratios):.2f}x; "
        f"ujson/orjson = {totals['ujson'] / totals['orjson']:.2f}x"
    )
    core_rows = bench_core(files, max(3, args.rounds // 2))
    core_table = table(["fixture", "imps", "bids", "parse us", "decide us", "render us", "core us"], core_rows)
    core_total = sorted(float(r[-1]) for r in core_rows)
    core_summary = f"core per request (parse+decide+render): median {median(core_total):.1f} us, max {core_total[-1]:.1f} us"
    text = "\n\n".join(
        [
            "## JSON parsing",
            "Command: `.venv/bin/python benchmarks/json_parse.py --record` (best of "
            f"{args.rounds} interleaved rounds per fixture and library, one process, CPU time per call)",
            "```\n" + machine + "\n```",
            summary,
            CHOICE,
            json_table,
            "What the whole pure core costs on the same fixtures (demo campaigns, demo model, no user store):",
            core_summary,
            core_table,
        ]
    )
    print(text)
    if args.record:
        record("json-parsing", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
