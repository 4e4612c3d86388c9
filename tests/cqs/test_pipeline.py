"""``tafe cqs pipeline`` on event logs written as a node writes them: join, store, train, judge, publish."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from xxhash import xxh3_64_hexdigest

pytest.importorskip("numpy")

from tafe.core.types import BidRequest, Imp  # noqa: E402
from tafe.cqs import model as model_mod  # noqa: E402
from tafe.cqs import open_snapshot  # noqa: E402
from tafe.cqs.features import names  # noqa: E402
from tafe.cqs.offline import pipeline  # noqa: E402
from tafe.cqs.offline.synth import aggregate  # noqa: E402
from tafe.cqs.store import open_store  # noqa: E402
from tafe.settings import DATA_DIR  # noqa: E402

DEMO = str(DATA_DIR / "model.cqsm")
T0 = 1_767_225_600.0
SIZES = ((300, 250), (728, 90), (320, 50))


def clicky(user: str) -> bool:
    return int(xxh3_64_hexdigest(user.encode()), 16) % 5 == 0  # the hidden rule: a fifth of users click much more


def write_world(directory: Path, *, users: int = 300, views: int = 6000, seed: int = 1, t0: float = T0,
                fresh_store: bool = False) -> dict[str, int]:
    """An event log as a node writes it: decisions (no store yet, or with ``fresh_store`` one that
    always knows the user's history up to the decision), imp notices, clicks by the hidden rule."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    clicks = 0
    serving = open_snapshot(DEMO)
    history: dict[str, list[tuple[float, str]]] = {}
    with open(directory / f"events-test-{seed}.jsonl", "w") as f:
        for n in range(views):
            user = f"user-{rng.randrange(users)}"
            ts = t0 + n * 10.0
            w, h = rng.choice(SIZES)
            request = BidRequest(id=f"r{n}", imps=(), channel="site", domain="news.example", devicetype=2, country="USA",
                                 user_keys=(user,))  # fmt: skip
            imp = Imp(id="1", banner_sizes=((w, h),), has_banner=True)
            bid = f"b{seed}-{n}"
            uhash = xxh3_64_hexdigest(user.encode())
            f.write(json.dumps({"event": "decision", "ts": ts, "request_id": f"r{n}", "imp_id": "1", "bid_id": bid,
                                "cqs": serving.score(request, imp, ts).value,
                                "features": names(request, imp, aggregate(history.get(user, []), ts) if fresh_store else None, ts, ts)})
                    + "\n")  # fmt: skip
            if rng.random() < 0.3:  # lost: a loss notice, nothing shown
                f.write(json.dumps({"event": "loss", "outcome": "accepted", "bid_id": bid, "user": uhash, "ts": ts + 0.1}) + "\n")
                continue
            f.write(json.dumps({"event": "win", "outcome": "accepted", "bid_id": bid, "user": uhash, "ts": ts + 0.1}) + "\n")
            f.write(json.dumps({"event": "imp", "outcome": "accepted", "bid_id": bid, "user": uhash, "ts": ts + 0.2}) + "\n")
            history.setdefault(user, []).append((ts + 0.1, "shown"))
            if rng.random() < (0.3 if clicky(user) else 0.02):
                clicks += 1
                f.write(json.dumps({"event": "click", "outcome": "accepted", "bid_id": bid, "user": uhash, "ts": ts + 1}) + "\n")
                history[user].append((ts + 1, "click"))
        f.write('{"event": "imp", "outc')  # the torn tail of a file being written
    return {"clicks": clicks}


def test_round_publishes_a_better_model_and_a_store_that_knows_the_clickers(tmp_path: Path) -> None:
    write_world(tmp_path / "events")
    out = tmp_path / "watch"
    out.mkdir()
    report = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14)
    assert report["bad_lines"] == 1
    assert report["serving"]["version"] == "demo-1"
    assert report["better"] and report["new"]["auc"] > report["serving"]["auc"] + 0.1, report
    store_path, model_path = report["published"]
    assert sorted(os.listdir(out)) == sorted([os.path.basename(store_path), os.path.basename(model_path)])  # no dot-files left
    model = model_mod.load(model_path)
    assert model.version == report["new"]["version"] and model.heads[0].name == "click"
    with open_store(store_path) as store:
        assert store.users == 300
        states = {u: store.lookup([f"user-{u}"]) for u in range(300)}
    clickers = [s.clicks_30d for u, s in states.items() if clicky(f"user-{u}")]
    others = [s.clicks_30d for u, s in states.items() if not clicky(f"user-{u}")]
    assert sum(clickers) / len(clickers) > 5 * sum(others) / len(others)
    assert all(s.shown_7d > 0 for s in states.values())


def test_the_bid_level_stays_that_of_the_serving_model(tmp_path: Path) -> None:
    """Scored as a node scores (model plus store), the new pair's mean is the demo model's: money moves between users."""
    write_world(tmp_path / "events")
    out = tmp_path / "watch"
    out.mkdir()
    report = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14)
    assert report["serving"]["mean_score"] > 0.2 > report["new"]["mean_score"]  # demo's visit head vs raw click rate
    before, after = open_snapshot(DEMO), open_snapshot(report["published"][1], report["published"][0])
    now = report["as_of"] + 600
    old, new, by_rule = [], [], {True: [], False: []}
    for u in range(300):
        for w, h in SIZES:
            request = BidRequest(id=f"q{u}", imps=(), channel="site", domain="news.example", devicetype=2, country="USA",
                                 user_keys=(f"user-{u}",))  # fmt: skip
            imp = Imp(id="1", banner_sizes=((w, h),), has_banner=True)
            old.append(before.score(request, imp, now).value)
            new.append(after.score(request, imp, now).value)
            by_rule[clicky(f"user-{u}")].append(new[-1])
    assert abs(sum(new) / len(new) - sum(old) / len(old)) < 0.1 * sum(old) / len(old)
    assert sum(by_rule[True]) / len(by_rule[True]) > 1.5 * sum(by_rule[False]) / len(by_rule[False])  # the clickers get most of it


def test_a_model_no_better_than_the_serving_one_is_not_published_unless_forced(tmp_path: Path) -> None:
    """Served with a store that always knew the history, a log teaches the pipeline nothing the
    model it made from that same log does not know: the second round publishes nothing."""
    write_world(tmp_path / "events", fresh_store=True)
    out = tmp_path / "watch"
    out.mkdir()
    first = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14, force=True)
    again = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14)
    assert again["serving"]["path"] == first["published"][-1]  # the newest *.cqsm in --out is what serves
    assert abs(again["new"]["auc"] - again["serving"]["auc"]) < pipeline.MIN_GAIN, again
    assert not again["better"] and again["published"] == []
    forced = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14, force=True)
    assert len(forced["published"]) == 2 and all(os.path.exists(p) for p in forced["published"])


def test_a_record_never_sees_its_own_click(tmp_path: Path) -> None:
    """A record's history is what came before its decision: its own impression and click are not in it."""
    request = BidRequest(id="r", imps=(), channel="site", devicetype=2, user_keys=("u",))
    user = xxh3_64_hexdigest(b"u")
    lines = []
    for n, ts in enumerate((T0, T0 + 7000)):
        lines += [{"event": "decision", "ts": ts, "bid_id": f"b{n}", "cqs": 0.3, "features": names(request, Imp(id="1"), None, ts)},
                  {"event": "imp", "outcome": "accepted", "bid_id": f"b{n}", "user": user, "ts": ts + 1},
                  {"event": "click", "outcome": "accepted", "bid_id": f"b{n}", "user": user, "ts": ts + 2}]  # fmt: skip
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    db = pipeline._open_db(str(tmp_path / "db"))
    pipeline.load(db, [str(tmp_path / "e.jsonl")])
    assert pipeline.walk(db, str(tmp_path / "k"), str(tmp_path / "r"), T0 + 7002, model_mod.load(DEMO)) == {"users": 1, "records": 2}
    (first, label1), (second, label2) = [(json.loads(f), y) for f, y in db.execute("SELECT features, label FROM record ORDER BY ts")]
    assert label1 == label2 == 1
    assert "known=0" in first and not any(f.startswith("k7d=") for f in first)
    assert "known=1" in second and "k7d=1" in second and "s7d=1" in second and "rk=1" in second  # one click, 1-3 hours before
    history = aggregate([(T0 + 1, "shown"), (T0 + 2, "click")], T0 + 7000)
    assert sorted(second) == sorted(names(request, Imp(id="1"), history, T0 + 7000, T0 + 7000))  # what a node computes from a store


@pytest.mark.parametrize(
    "args, message",
    [
        (["--events", "/nonexistent/events"], "--events /nonexistent/events: not a directory"),
        (["--events", "{tmp}", "--holdback", "1.5"], "--holdback must be within 0..1"),
        (["--events", "{tmp}"], "no win, impression or click notices in 0 files"),
        (["--events", "{tmp}", "--tmp", "/nonexistent/tmp"], "--tmp /nonexistent/tmp: not a directory"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "tafe", "cqs", "pipeline", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_an_unreadable_events_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "events" / "bad.jsonl").mkdir(parents=True)  # matches *.jsonl, cannot be read
    with pytest.raises(pipeline.CqsError, match=r"events file .*bad.jsonl: cannot read \(Is a directory\)"):
        pipeline.run(str(tmp_path / "events"), str(tmp_path), serving_default=DEMO)
