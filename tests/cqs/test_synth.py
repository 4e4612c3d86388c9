"""The synthetic world: deterministic, in the documented formats, long-tailed, consistent."""

from __future__ import annotations

import json
from pathlib import Path

from tafe.cqs.offline import synth
from tafe.cqs.state import EVENT_TYPES, NEVER, UserState

AS_OF = 1_767_225_600.0


def test_same_seed_same_files(tmp_path: Path) -> None:
    a = synth.write(str(tmp_path / "a"), users=300, requests=500, seed=5, as_of=AS_OF)
    b = synth.write(str(tmp_path / "b"), users=300, requests=500, seed=5, as_of=AS_OF)
    c = synth.write(str(tmp_path / "c"), users=300, requests=500, seed=6, as_of=AS_OF)
    for name in ("events.jsonl", "decisions.jsonl", "requests.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "events.jsonl").read_bytes() != (tmp_path / "c" / "events.jsonl").read_bytes()
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    assert c["seed"] == 6


def test_formats_and_shape(tmp_path: Path) -> None:
    summary = synth.write(str(tmp_path), users=2000, requests=3000, unknown=0.3, seed=2, as_of=AS_OF)
    per_user: dict[str, int] = {}
    for line in (tmp_path / "events.jsonl").open():
        ev = json.loads(line)
        assert set(ev) == {"user", "ts", "type"} and ev["type"] in EVENT_TYPES and ev["ts"] <= AS_OF
        per_user[ev["user"]] = per_user.get(ev["user"], 0) + 1
    counts = sorted(per_user.values())
    # long tail: the busiest 1% of users hold far more than 1% of events
    top = sum(counts[-len(counts) // 100 :])
    assert top > 0.08 * sum(counts)
    assert counts[len(counts) // 2] < 40
    decisions = [json.loads(line) for line in (tmp_path / "decisions.jsonl").open()]
    assert len(decisions) == 3000
    known = [d for d in decisions if d["known"]]
    assert 0.6 < len(known) / len(decisions) < 0.8
    for d in decisions[:50]:
        assert set(d["outcomes"]) == {"visit", "click", "purchase"} and all(v in (0, 1) for v in d["outcomes"].values())
        assert ("known=1" in d["features"]) == d["known"]
        assert 0 < d["p_true"]["visit"] < 1
    rates = summary["outcome_rates"]
    assert 0.1 < rates["visit"] < 0.6 and 0 < rates["click"] < 0.1 and rates["purchase"] < 0.05
    requests = [json.loads(line) for line in (tmp_path / "requests.jsonl").open()]
    assert len(requests) == 3000 and all(r["imp"] and r["id"] for r in requests)
    users = set(per_user)
    assert sum(r.get("user", {}).get("buyeruid") in users for r in requests) == len(known)


def test_aggregate_windows_and_recency() -> None:
    h = 3600.0
    events = [(AS_OF - 2 * h, "view"), (AS_OF - 30 * h, "view"), (AS_OF - 10 * 24 * h, "view"), (AS_OF - 5 * h, "cart"),
              (AS_OF - 400 * 24 * h, "purchase"), (AS_OF - 1 * h, "shown"), (AS_OF + 5 * h, "view")]
    s = synth.aggregate(events, AS_OF)
    assert isinstance(s, UserState)
    assert (s.views_1d, s.views_7d, s.views_30d) == (1, 2, 3)
    assert (s.carts_7d, s.purchases_365d, s.shown_1d, s.clicks_30d) == (1, 0, 1, 0)
    assert (s.hours_since_view, s.hours_since_cart, s.hours_since_click) == (2, 5, NEVER)
    assert s.hours_since_purchase == NEVER  # older than the 365 days the store keeps
    assert synth.aggregate([(AS_OF - 200 * 24 * h, "purchase")], AS_OF).hours_since_purchase == 4800
    assert synth.aggregate([(AS_OF - 400 * 24 * h, "view")], AS_OF) is None


def test_store_built_from_synth_events_agrees(tmp_path: Path) -> None:
    """The store's lookup answers exactly the state synth scored each decision with."""
    from tafe.cqs import model as model_mod
    from tafe.cqs import open_snapshot
    from tafe.cqs.store import build_store

    population, stream = synth.simulate(users=800, requests=400, unknown=0.3, seed=4, as_of=AS_OF)
    synth.write(str(tmp_path), users=800, requests=400, unknown=0.3, seed=4, as_of=AS_OF)
    build_store([str(tmp_path / "events.jsonl")], str(tmp_path / "users.store"), as_of=AS_OF, version="synth-4")
    model_mod.constant("c-1", {"visit": 0.0}).save(str(tmp_path / "m.cqsm"))
    snap = open_snapshot(str(tmp_path / "m.cqsm"), str(tmp_path / "users.store"))
    assert snap.versions == {"model": "c-1", "store": "synth-4"}
    by_key = {u.key: u.state for u in population}
    requests = [json.loads(line) for line in (tmp_path / "requests.jsonl").open()]
    decisions = [json.loads(line) for line in (tmp_path / "decisions.jsonl").open()]
    for body, decision in zip(requests, decisions):
        key = body.get("user", {}).get("buyeruid", "")
        state = snap.store.lookup([key]) if key else None
        assert state == by_key.get(key), key
        assert (state is not None) == decision["known"]
    assert any(d["known"] for d in decisions) and not all(d["known"] for d in decisions)
