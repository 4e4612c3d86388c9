"""``tafe cqs synth|train|evaluate|inspect|build-store``: the CQS model's life cycle offline.

A worked example (also how the bundled demo model is made, see ``tafe.cqs.model``)::

    tafe cqs synth --out /tmp/cqs --users 20000 --requests 200000 --seed 7
    tafe cqs build-store /tmp/cqs/events.jsonl --out /tmp/cqs/users.store --as-of 1767225600
    tafe cqs train /tmp/cqs/decisions.jsonl --out /tmp/cqs/model.cqsm
    tafe cqs evaluate /tmp/cqs/model.cqsm /tmp/cqs/decisions.jsonl
    tafe cqs inspect /tmp/cqs/model.cqsm

The daily round on a node's own ``--event-log`` (join, store, train, evaluate, publish; and
first-price shading learned from its win and loss notices)::

    tafe cqs pipeline --events /var/log/tafe/events --out /var/lib/tafe/cqs
"""

from __future__ import annotations

import argparse
import json
import sys

from tafe.cqs import CqsError

SUBCOMMANDS = ("synth", "train", "evaluate", "inspect", "build-store", "pipeline")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    subs = parser.add_subparsers(dest="cqs_command", metavar="SUBCOMMAND", required=True)

    p = subs.add_parser("synth", help="generate a synthetic population: events, decision logs with outcomes, requests")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write events.jsonl, decisions.jsonl, requests.jsonl, truth.json")
    p.add_argument("--users", type=int, default=20_000, help="users in the population (default 20000)")
    p.add_argument("--requests", type=int, default=100_000, help="bid requests (one imp each) with outcomes (default 100000)")
    p.add_argument("--unknown", type=float, default=0.3, help="fraction of requests from users the store does not know (default 0.3)")
    p.add_argument("--seed", type=int, default=1, help="random seed: same seed, same files (default 1)")
    p.add_argument("--as-of", type=float, default=1_767_225_600.0, help="unix time the history ends (default 2026-01-01)")

    p = subs.add_parser("train", help="fit a model file from decision logs (JSON lines with features and outcomes)")
    p.add_argument("logs", nargs="+", help="decision log files")
    p.add_argument("--out", required=True, help="model file to write (atomically)")
    p.add_argument("--dims", type=int, default=1 << 18, help="hash space size, a power of two (default 262144)")
    p.add_argument("--heads", default="visit,click,purchase", help="outcomes to learn, the first is the CQS (default visit,click,purchase)")
    p.add_argument("--version", default="", help="model version string (default: derived from the data and time)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training split (default 3)")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty, applied per example to the weights it touches (default 0.001)")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of records kept out for evaluation (default 0.2)")
    p.add_argument("--seed", type=int, default=1, help="shuffle seed (default 1)")

    p = subs.add_parser("evaluate", help="AUC, log loss and calibration of a model on the held-out split of decision logs")
    p.add_argument("model", help="model file")
    p.add_argument("logs", nargs="+", help="decision log files")
    p.add_argument("--holdout", type=float, default=0.2, help="the held-out fraction used by train (default 0.2)")
    p.add_argument("--all", action="store_true", help="evaluate on every record, not only the held-out split")
    p.add_argument("--bins", type=int, default=10, help="calibration table rows (default 10)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = subs.add_parser("inspect", help="validate a model file and print its header and heaviest features")
    p.add_argument("model", help="model file")
    p.add_argument("--top", type=int, default=10, help="largest weights to list per head (default 10)")
    p.add_argument("--names", metavar="LOG", help="decision log whose feature strings name the listed weights")

    p = subs.add_parser("pipeline", help="the daily round: join the event log, build a store, train, learn first-price shading, evaluate, publish if better")
    p.add_argument("--events", required=True, metavar="DIR", help="a node's --event-log directory (every *.jsonl under it)")
    p.add_argument("--out", required=True, metavar="WATCH_DIR", help="the nodes' --watch-dir: the serving model is its newest *.cqsm")
    p.add_argument("--force", action="store_true", help="publish even when the new model (or shading table) is not better")
    p.add_argument("--holdback", type=float, default=0.2, help="latest fraction of the records (by time) held back to compare the models, and of the first-price notices to judge the shading table (default 0.2)")
    p.add_argument("--dims", type=int, default=1 << 18, help="hash space size, a power of two (default 262144)")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training records (default 3)")
    p.add_argument("--seed", type=int, default=1, help="shuffle seed (default 1)")
    p.add_argument("--fixed-shade", type=float, default=0.85, metavar="F",
                   help="the campaigns' first_price_shade: what learned shading must beat at as many wins (default 0.85)")
    p.add_argument("--shade-min", type=float, default=0.3, metavar="F", help="learned shades never go below this fraction of the value (default 0.3)")
    p.add_argument("--tmp", default=None, metavar="DIR", help="where the on-disk join goes (default: the system temp directory)")

    p = subs.add_parser("build-store", help="build the memory-mapped user-state store from event files")
    try:
        from tafe.cqs import store
    except ImportError:
        p.set_defaults(_store_missing=True)
    else:
        store.add_arguments(p)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except CqsError as exc:
        print(f"tafe cqs: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        if exc.name != "numpy":
            raise
        print(f"tafe cqs {args.cqs_command}: needs numpy, which the bid path does not: pip install 'tafe[train]'", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    cmd = args.cqs_command
    if cmd == "synth":
        from tafe.cqs.offline import synth

        summary = synth.write(args.out, users=args.users, requests=args.requests, unknown=args.unknown, seed=args.seed, as_of=args.as_of)
        print(json.dumps(summary, indent=2))
        return 0
    if cmd == "train":
        from tafe.cqs.offline import train

        heads = [h for h in args.heads.split(",") if h]
        model, report = train.train_files(
            args.logs, dims=args.dims, heads=heads, version=args.version, epochs=args.epochs,
            l2=args.l2, holdout=args.holdout, seed=args.seed,
        )
        model.save(args.out)
        print(json.dumps({"out": args.out, "version": model.version, **report}, indent=2))
        return 0
    if cmd == "evaluate":
        from tafe.cqs import model as model_mod
        from tafe.cqs.offline import train

        report = train.evaluate_files(model_mod.load(args.model), args.logs, holdout=None if args.all else args.holdout, bins=args.bins)
        print(json.dumps(report, indent=2) if args.json else train.format_report(report))
        return 0
    if cmd == "inspect":
        from tafe.cqs import model as model_mod
        from tafe.cqs.offline import train

        model = model_mod.load(args.model)
        names = train.feature_names([args.names], model.dims) if args.names else None
        print(model_mod.describe(model, top=args.top, names=names))
        return 0
    if cmd == "pipeline":
        from tafe.cqs.offline import pipeline
        from tafe.settings import DATA_DIR

        report = pipeline.run(args.events, args.out, serving_default=str(DATA_DIR / "model.cqsm"), force=args.force, holdback=args.holdback,
                              dims=args.dims, epochs=args.epochs, seed=args.seed, tmp_dir=args.tmp, fixed_shade=args.fixed_shade,
                              shade_min=args.shade_min)  # fmt: skip
        print(json.dumps(report, indent=2))
        return 0
    if cmd == "build-store":
        if getattr(args, "_store_missing", False):
            print("tafe cqs: build-store is not available in this build", file=sys.stderr)
            return 1
        from tafe.cqs import store

        return int(store.run(args) or 0)
    raise AssertionError(cmd)
