"""``tafe cqs pipeline``: one daily round, from a node's event log to a published model and store.

1. **Load**: every ``*.jsonl`` under ``--events`` (``--event-log`` files) goes into a
   SQLite database in a temp file: decisions by bid id, notices (win, bill, imp, click)
   by bid id. A line that is not JSON (e.g. the torn tail of a file still being written)
   is counted and skipped.
2. **Join**: a bid was *shown* when it has a win, bill or impression notice, *clicked*
   when it has a click. Every shown decision becomes a training record labelled
   ``click``; the user (the notices' ``user``: the hex XXH3-64 the store keys by) comes
   from its notices.
3. **Walk** each user's timeline in (user, time) order: a record's user features are
   recomputed from the user's shown and click events *before* the decision (so the
   label never leaks into its own features), and at the end of the user the user's
   state as of the last event goes into the new store (built from hashes).
4. **Train** a one-head (``click``) model on the records before the held-back slice
   (the latest ``--holdback`` of the records by time), by Adagrad over chunks.
5. **Evaluate** it against the model now serving (the newest ``*.cqsm`` in ``--out``,
   else the bundled demo model) on the held-back slice: the primary head's AUC of the
   click. New model and new store are judged together against the serving model on the
   features the node logged (its store as it was); the report also gives the serving
   model with the new store. Bids are
   ``base_cpm * score / score_pivot``, so the new model's bias is shifted until its mean
   score on that slice equals the mean score the node served there (the decisions'
   ``cqs``): a new model moves money between users, not the campaigns' price level.
6. **Publish** store, then model, into ``--out`` (each under a dot-name, then renamed)
   only when the new AUC is higher (by ``MIN_GAIN``), or with ``--force``. Nodes watching that directory
   swap them in.
7. **Shading**, from the same files: every first-price win and loss notice is a row
   (``tafe.cqs.offline.shading``); the table learned on the rows before their own
   held-back slice is published as ``shading-<version>.cqsb`` when, on that slice, it
   costs less per expected win than the fixed ``--fixed-shade`` at as many expected wins
   (or with ``--force``), whatever the model's verdict. With no first-price rows there
   is no table and the report says why (``shading.why_not``). A round with too little to
   train a model on (no logged decision of a shown bid) still publishes the table, and
   the report says why there is no model (``model.skipped``); with neither, it fails.

Memory does not grow with the number of events: SQLite sorts and joins on disk (its page
cache is capped at 16 MB), one user's history is in memory at a time, the store's keys
and records are written to temp files and memory-mapped, training and evaluation read
``CHUNK`` records at a time, and AUC is computed from fixed histograms. Shading's rows
sit in SQLite too; it holds one histogram of log-price bins per context (memory grows
with the contexts, not the notices).
"""

from __future__ import annotations

import glob
import math
import os
import sqlite3
import tempfile
import time
import zlib
from array import array
from collections.abc import Iterator
from typing import Any

import numpy as np
import orjson

from tafe.core.shading import MIN_LO
from tafe.core.types import BidRequest, Imp
from tafe.cqs import CqsError
from tafe.cqs import model as model_mod
from tafe.cqs.features import COUNT_FIELDS, RECENCY_FIELDS, SPEC, hash_names, names
from tafe.cqs.model import Head, Model, sigmoid
from tafe.cqs.offline import shading
from tafe.cqs.offline.synth import aggregate
from tafe.cqs.offline.train import _f32, _gather, _sigmoid
from tafe.cqs.state import UserState
from tafe.cqs.store import RECORD, write_store

CHUNK = 20_000  # records per training or evaluation step
HEAD = "click"
SHOWN_KINDS = ("win", "bill", "imp")
KEPT_OUTCOMES = ("accepted", "duplicate", "encrypted_price")  # the notice happened
YEAR = 365 * 86400.0
# Features that depend on the user's history: recomputed from the joined events.
USER_FEATURES = frozenset((*COUNT_FIELDS, *RECENCY_FIELDS, "known", "cartab", "ctr", "rv*dt", "rc*dt", "rk*ch", "v30d*ch", "s1d*q"))
_AUC_BINS = 1 << 16
# AUC a new pair must gain over the serving one to be published: histogram binning and
# float32 weights are not a reason to swap.
MIN_GAIN = 0.001


def event_files(events_dir: str) -> list[str]:
    if not os.path.isdir(events_dir):
        raise CqsError(f"--events {events_dir}: not a directory")
    return sorted(glob.glob(os.path.join(events_dir, "**", "*.jsonl"), recursive=True))


def current_model(out_dir: str, default: str) -> str:
    """The model a node watching ``out_dir`` serves: its newest ``*.cqsm``, else ``default``."""
    found = [os.path.join(out_dir, n) for n in os.listdir(out_dir) if n.endswith(".cqsm") and not n.startswith(".")]
    return max(found, key=lambda p: (os.stat(p).st_mtime_ns, p)) if found else default


# --- 1. load -------------------------------------------------------------------------------


def _open_db(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.executescript("""
        PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA temp_store = FILE; PRAGMA cache_size = -16384;
        CREATE TABLE decision (bid_id TEXT PRIMARY KEY, ts REAL, cqs REAL, features TEXT) WITHOUT ROWID;
        CREATE TABLE notice (bid_id TEXT, kind TEXT, user TEXT, ts REAL);
    """ + shading.SCHEMA)
    return db


def load(db: sqlite3.Connection, paths: list[str]) -> dict[str, int]:
    """Insert decisions and notices, a batch at a time; counts of what was read."""
    counts = {"decisions": 0, "notices": 0, "bad_lines": 0, "ignored": 0}
    decisions: list[tuple[str, float, float, str]] = []
    notices: list[tuple[str, str, str, float]] = []
    shade_rows: list[tuple[str, float, str, int, int, int]] = []

    def flush() -> None:
        db.executemany("INSERT OR IGNORE INTO decision VALUES (?, ?, ?, ?)", decisions)
        db.executemany("INSERT INTO notice VALUES (?, ?, ?, ?)", notices)
        db.executemany("INSERT OR IGNORE INTO shade VALUES (?, ?, ?, ?, ?, ?)", shade_rows)  # a bid's first notice
        decisions.clear()
        notices.clear()
        shade_rows.clear()

    for path in paths:
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise CqsError(f"events file {path}: cannot read ({exc.strerror or exc})") from None
        with f:
            for line in f:
                try:
                    e = orjson.loads(line)
                    kind = e["event"]
                    if kind in ("win", "bill", "loss") and e.get("context") and e.get("outcome") in KEPT_OUTCOMES:
                        if (r := shading.row(e)) is not None:
                            shade_rows.append(r)
                    if kind == "decision":
                        decisions.append((str(e["bid_id"]), float(e["ts"]), float(e.get("cqs") or 0), orjson.dumps(e["features"]).decode()))
                        counts["decisions"] += 1
                    elif (kind in SHOWN_KINDS or kind == "click") and e.get("outcome") in KEPT_OUTCOMES:
                        notices.append((str(e["bid_id"]), kind, str(e.get("user") or ""), float(e["ts"])))
                        counts["notices"] += 1
                    else:
                        counts["ignored"] += 1
                except (ValueError, KeyError, TypeError):
                    if line.strip():
                        counts["bad_lines"] += 1
                    continue
                if len(decisions) + len(notices) + len(shade_rows) >= CHUNK:
                    flush()
    flush()
    db.executescript("""
        CREATE TABLE bid AS SELECT bid_id, max(user) AS user,
            min(CASE WHEN kind != 'click' THEN ts END) AS shown_ts, min(CASE WHEN kind = 'click' THEN ts END) AS click_ts
            FROM notice GROUP BY bid_id;
        DROP TABLE notice;
        CREATE TABLE record (ord INTEGER, ts REAL, label INTEGER, cqs REAL, served REAL, features TEXT);
    """)
    return counts


# --- 2, 3. join and walk --------------------------------------------------------------------


def user_features(features: list[str], state: UserState | None) -> list[str]:
    """``features`` with the history part replaced by what ``state`` says (None: unknown user)."""
    kept = [f for f in features if f.partition("=")[0] not in USER_FEATURES]
    value = {k: v for k, _, v in (f.partition("=") for f in kept if f[:3] in ("dt=", "ch=", "hr="))}
    dt = int(value.get("dt", "0") or 0)
    hr = int(value.get("hr", "0") or 0)
    request = BidRequest(id="", imps=(), channel=value.get("ch", ""), devicetype=dt or None)
    history = names(request, Imp(id=""), state, hr * 3600.0, hr * 3600.0)
    return kept + [f for f in history if f.partition("=")[0] in USER_FEATURES]


def _timeline(db: sqlite3.Connection) -> Iterator[tuple[str, float, int, Any, Any, Any]]:
    """(user, ts, kind, features, label, cqs), by user then time; kind 0 shown, 1 click, 2 a record (first at a tie)."""
    yield from db.execute("""
        SELECT user, shown_ts, 0, NULL, NULL, NULL FROM bid WHERE user != '' AND shown_ts IS NOT NULL
        UNION ALL SELECT user, click_ts, 1, NULL, NULL, NULL FROM bid WHERE user != '' AND click_ts IS NOT NULL
        UNION ALL SELECT b.user, d.ts, 2, d.features, b.click_ts IS NOT NULL, d.cqs
            FROM decision d JOIN bid b ON b.bid_id = d.bid_id WHERE b.shown_ts IS NOT NULL
        ORDER BY 1, 2, 3 DESC
    """)


_HEX = frozenset("0123456789abcdef")


def _user_key(user: str) -> int | None:
    """The store key of a notice's ``user`` (16 lower-case hex digits: text order is key order)."""
    return int(user, 16) if len(user) == 16 and _HEX.issuperset(user) else None


def walk(db: sqlite3.Connection, keys_path: str, records_path: str, as_of: float, serving: Model) -> dict[str, int]:
    """Write training records into ``record`` and the store's sorted keys and records to files.

    A record keeps ``served``: the serving model's score on the features the node logged
    (computed with the store it served with), the incumbent the new pair must beat.
    """
    out = db.cursor()
    rows: list[tuple[int, float, int, float, float, str]] = []
    users = records = 0
    with open(keys_path, "wb") as keys_f, open(records_path, "wb") as recs_f:
        current: str | None = None
        history: list[tuple[float, str]] = []

        def close_user() -> None:
            nonlocal users
            key = _user_key(current or "")
            state = aggregate(history, as_of) if key is not None else None
            if key is not None and state is not None:
                keys_f.write(key.to_bytes(8, "little"))
                recs_f.write(RECORD.pack(*state))
                users += 1

        for user, ts, kind, features, label, cqs in _timeline(db):
            if user != current:
                close_user()
                current, history = user, []
            if kind == 0:
                history.append((ts, "shown"))
            elif kind == 1:
                history.append((ts, "click"))
            else:
                history = [h for h in history if ts - h[0] < YEAR]
                state = aggregate(history, ts) if _user_key(user) is not None else None
                logged = orjson.loads(features)
                served = sigmoid(serving.logit(hash_names(logged, serving.dims)))
                feats = user_features(logged, state)
                rows.append((zlib.crc32(features.encode() + str(ts).encode()), ts, int(label), cqs, served, orjson.dumps(feats).decode()))
                records += 1
                if len(rows) >= CHUNK:
                    out.executemany("INSERT INTO record VALUES (?, ?, ?, ?, ?, ?)", rows)
                    rows.clear()
        close_user()
    out.executemany("INSERT INTO record VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.execute("CREATE INDEX record_ts ON record (ts)")
    db.execute("CREATE INDEX record_ord ON record (ord)")  # training reads in this order: no sort in memory
    return {"users": users, "records": records}


# --- 4, 5. train and evaluate ---------------------------------------------------------------


class Chunk:
    """CSR rows of unmasked CRC-32 feature hashes (mask per model: dims differ) and labels."""

    def __init__(self, rows: list[tuple[int, str, float]], cache: dict[str, int]) -> None:
        crcs = array("q")  # 8 bytes a feature, not a list's 36
        indptr = array("q", [0])
        for row in rows:
            for name in orjson.loads(row[1]):
                h = cache.get(name)
                if h is None:
                    if len(cache) > 1_000_000:
                        cache.clear()
                    h = cache[name] = zlib.crc32(name.encode())
                crcs.append(h)
            indptr.append(len(crcs))
        self.crcs = np.frombuffer(crcs, dtype=np.int64)
        self.indptr = np.frombuffer(indptr, dtype=np.int64)
        self.labels = np.array([r[0] for r in rows], dtype=np.float64)
        self.served = np.array([r[2] for r in rows], dtype=np.float64)  # the serving model's score, as served

    def logits(self, weights: np.ndarray, bias: float) -> np.ndarray:
        n = len(self.labels)
        row_of = np.repeat(np.arange(n), np.diff(self.indptr))
        return bias + np.bincount(row_of, weights=weights[self.crcs & (len(weights) - 1)], minlength=n)


def _chunks(db: sqlite3.Connection, where: str, order: str, args: tuple[float]) -> Iterator[Chunk]:
    cache: dict[str, int] = {}
    cursor = db.execute(f"SELECT label, features, served FROM record WHERE {where} ORDER BY {order}", args)
    while rows := cursor.fetchmany(CHUNK):
        yield Chunk(rows, cache)


def fit(db: sqlite3.Connection, cutoff: float, dims: int, epochs: int, l2: float = 1e-3, lr: float = 0.05,
        batch: int = 256, seed: int = 1) -> tuple[np.ndarray, float]:
    """Adagrad on the click log loss over the records before ``cutoff``, a chunk at a time."""
    n, clicks = db.execute("SELECT count(*), coalesce(sum(label), 0) FROM record WHERE ts < ?", (cutoff,)).fetchone()
    if n == 0:
        raise CqsError("no training records: no shown bid of a logged decision before the held-back slice")
    rate = min(max(clicks / n, 1e-6), 1 - 1e-6)
    w, G = np.zeros(dims), np.full(dims, 1e-8)
    b, Gb = math.log(rate / (1 - rate)), 1e-8
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for chunk in _chunks(db, "ts < ?", "ord", (cutoff,)):
            idx_all = chunk.crcs & (dims - 1)
            rows_n = len(chunk.labels)
            order = rng.permutation(rows_n)
            for start in range(0, rows_n, batch):
                rows = order[start : start + batch]
                take, lens = _gather(chunk.indptr, rows)
                idx = idx_all[take]
                row_of = np.repeat(np.arange(len(rows)), lens)
                uniq, inv = np.unique(idx, return_inverse=True)
                z = b + np.bincount(row_of, weights=w[idx], minlength=len(rows))
                g = _sigmoid(z) - chunk.labels[rows]
                gw = np.bincount(inv, weights=g[row_of], minlength=len(uniq)) + l2 * len(rows) * w[uniq]
                G[uniq] += gw * gw
                w[uniq] -= lr * gw / np.sqrt(G[uniq])
                gb = float(g.sum())
                Gb += gb * gb
                b -= lr * gb / math.sqrt(Gb)
    return w, b


class Judge:
    """Streaming AUC (histograms of the score by label), log loss and mean of one model's primary head."""

    def __init__(self) -> None:
        self.hist = np.zeros((2, _AUC_BINS))
        self.loss = 0.0
        self.total = 0.0
        self.n = 0

    def add(self, p: np.ndarray, labels: np.ndarray) -> None:
        bins = np.minimum((p * _AUC_BINS).astype(np.int64), _AUC_BINS - 1)
        for y in (0, 1):
            self.hist[y] += np.bincount(bins[labels == y], minlength=_AUC_BINS)
        q = np.clip(p, 1e-12, 1 - 1e-12)
        self.loss -= float(np.sum(labels * np.log(q) + (1 - labels) * np.log(1 - q)))
        self.total += float(p.sum())
        self.n += len(p)

    def auc(self) -> float:
        neg, pos = self.hist
        if pos.sum() == 0 or neg.sum() == 0:
            return float("nan")
        below = np.cumsum(neg) - neg  # negatives in lower bins; a tie in a bin counts half
        return float(((below + neg / 2) * pos).sum() / (pos.sum() * neg.sum()))

    def report(self) -> dict[str, float]:
        return {"auc": round(self.auc(), 5), "log_loss": round(self.loss / max(1, self.n), 5),
                "mean_score": round(self.total / max(1, self.n), 5)}


def level(logit_hist: np.ndarray, edges: np.ndarray, target: float) -> float:
    """The bias shift that makes the mean of sigmoid(z + shift) over the histogram equal ``target``."""
    mids = (edges[:-1] + edges[1:]) / 2
    weights = logit_hist / max(1.0, logit_hist.sum())
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float((weights * _sigmoid(mids + mid)).sum()) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def evaluate(db: sqlite3.Connection, cutoff: float, w: np.ndarray, b: float,
             serving: Model) -> tuple[Judge, Judge, Judge, float, float]:
    """Judges on the held-back slice of the new pair, of the serving pair (its model on the
    features it served) and of the serving model with the new store; the mean score served
    there (the decisions' ``cqs``) and the bias shift that gives the new model that mean."""
    new, old, old_new_store = Judge(), Judge(), Judge()
    head = serving.heads[0]
    old_w = np.frombuffer(head.weights, dtype=np.float32).astype(np.float64)
    edges = np.linspace(-20, 20, 8001)
    logit_hist = np.zeros(len(edges) - 1)
    for chunk in _chunks(db, "ts >= ?", "ts", (cutoff,)):
        z = chunk.logits(w, b)
        logit_hist += np.histogram(np.clip(z, -19.999, 19.999), bins=edges)[0]
        new.add(_sigmoid(z), chunk.labels)
        old.add(chunk.served, chunk.labels)
        old_new_store.add(_sigmoid(chunk.logits(old_w, head.bias)), chunk.labels)
    served = db.execute("SELECT avg(cqs) FROM record WHERE ts >= ? AND cqs > 0", (cutoff,)).fetchone()[0]
    served = served or old.total / max(1, old.n)  # decisions logged without their score: the serving model's mean
    return new, old, old_new_store, served, level(logit_hist, edges, served)


# --- the whole round --------------------------------------------------------------------------


def run(events_dir: str, out_dir: str, *, serving_default: str, force: bool = False, holdback: float = 0.2,
        dims: int = 1 << 18, epochs: int = 3, seed: int = 1, tmp_dir: str | None = None, fixed_shade: float = 0.85,
        shade_min: float = 0.3) -> dict[str, Any]:
    """One round; returns a report (``published``: the files written, empty when not better)."""
    if dims <= 0 or dims & (dims - 1):
        raise CqsError(f"--dims must be a power of two, got {dims}")
    if not 0 < holdback < 1:
        raise CqsError(f"--holdback must be within 0..1 (exclusive), got {holdback}")
    if not os.path.isdir(out_dir):
        raise CqsError(f"--out {out_dir}: not a directory")
    if tmp_dir is not None and not os.path.isdir(tmp_dir):
        raise CqsError(f"--tmp {tmp_dir}: not a directory")
    if not 0 < fixed_shade <= 1 or not MIN_LO <= shade_min <= fixed_shade:
        raise CqsError(f"--fixed-shade must be within (0, 1] and --shade-min within [{MIN_LO}, --fixed-shade]")
    paths = event_files(events_dir)
    serving_path = current_model(out_dir, serving_default)
    serving = model_mod.load(serving_path)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tafe-cqs-pipeline-", dir=tmp_dir) as tmp:
        db_path = os.path.join(tmp, "join.sqlite")
        db = _open_db(db_path)
        try:
            report: dict[str, Any] = {"events_files": len(paths), **load(db, paths)}
            policy, report["shading"] = shading.learn(db, fixed=fixed_shade, lo=shade_min, holdback=holdback)
            as_of = db.execute("SELECT max(max(coalesce(shown_ts, 0)), max(coalesce(click_ts, 0))) FROM bid").fetchone()[0]
            too_few = "" if as_of else f"--events {events_dir}: no win, impression or click notices in {len(paths)} files"
            if not too_few:
                keys_path, recs_path = os.path.join(tmp, "keys.bin"), os.path.join(tmp, "records.bin")
                report.update(walk(db, keys_path, recs_path, as_of, serving))
                n = report["records"]
                if n < 2:
                    too_few = f"--events {events_dir}: {n} shown bids with a logged decision; too few to train on"
            if too_few:  # no model this round; a shading table learned from the notices still goes out
                if policy is None or not (report["shading"]["better"] or force):
                    raise CqsError(too_few)
                as_of = as_of or db.execute("SELECT max(ts) FROM shade").fetchone()[0]
                path, report["shading"]["version"] = shading.publish(policy, out_dir, as_of, {"fixed_shade": fixed_shade})
                report.update({"model": {"skipped": too_few}, "published": [path], "seconds": round(time.monotonic() - t0, 2)})
                return report
            cutoff = db.execute("SELECT ts FROM record ORDER BY ts LIMIT 1 OFFSET ?", (int(n * (1 - holdback)),)).fetchone()[0]
            w, b = fit(db, cutoff, dims, epochs, seed=seed)
            new, old, old_new_store, served, shift = evaluate(db, cutoff, w, b, serving)
            report["join_bytes"] = os.path.getsize(db_path)
        except sqlite3.Error as exc:  # e.g. the temp directory's disk is full
            raise CqsError(f"the on-disk join in {tmp} failed ({exc}); --tmp DIR puts it elsewhere") from None
        finally:
            db.close()
        better = new.auc() > old.auc() + MIN_GAIN
        version = "cqs-%s-%08x" % (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(as_of)), zlib.crc32(w.tobytes()))
        report.update({
            "as_of": as_of, "heldback_from": cutoff, "serving": {"path": serving_path, "version": serving.version, **old.report(), "served_mean": round(served, 5),
                        "with_new_store": old_new_store.report()},
            "new": {"version": version, **new.report(), "level_shift": round(shift, 4)}, "better": better,
            "seconds": round(time.monotonic() - t0, 2), "published": [],
        })  # fmt: skip
        if policy is not None and (report["shading"]["better"] or force):
            path, report["shading"]["version"] = shading.publish(policy, out_dir, as_of, {"fixed_shade": fixed_shade})
            report["published"].append(path)
        if not (better or force):
            return report
        if report["users"]:
            keys = np.memmap(keys_path, dtype="<u8", mode="r")
            records = np.memmap(recs_path, dtype="<u2", mode="r").reshape(-1, len(UserState._fields))
            store_path = os.path.join(out_dir, f"users-{version}.cqss")
            write_store(keys, records, store_path, as_of=as_of, version=version)
            report["published"].append(store_path)
            del keys, records
    meta = {"trained_on": "events", "heldback": report["new"], "serving": report["serving"], "level_shift": shift}
    model = Model(version, dims, (Head(HEAD, float(b + shift), _f32(w)),), SPEC, meta)
    model_path = os.path.join(out_dir, f"model-{version}.cqsm")
    model.save(model_path)
    report["published"].append(model_path)
    return report

