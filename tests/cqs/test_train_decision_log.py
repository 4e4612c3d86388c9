"""The decision log: sampled, complete lines that training reads once outcomes are joined."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tafe.core.types import Bid, BidRequest, Creative, Decision, Imp, MediaType
from tafe.cqs import Snapshot
from tafe.cqs import model as model_mod
from tafe.cqs.decision_log import DecisionLog
from tafe.cqs.offline import train

NOW = 1_767_225_600.0
REQUEST = BidRequest(
    id="req-1", imps=(Imp(id="1", banner_sizes=((300, 250),), has_banner=True), Imp(id="2", native=True)),
    channel="app", bundle="com.example.game", os="android", devicetype=4, country="DEU", gdpr=True, consent="CP...",
    user_keys=("buyer-9",),
)
CREATIVE = Creative(id="cr-1", format=MediaType.BANNER, w=300, h=250)


def _decision(request: BidRequest, imps: tuple[str, ...] = ("1", "2"), privacy: str | None = None) -> Decision:
    bids = tuple(Bid(f"b-{request.id}-{i}", i, 1.5, "camp-1", CREATIVE, ("shop.example",), (), cqs=0.42) for i in imps)
    return Decision(request.id, bids=bids, privacy=privacy)


@pytest.fixture
def snapshot() -> Snapshot:
    return Snapshot(model_mod.constant("log-test-1", {"visit": -0.5, "click": -3.0}))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_bid_logged_with_features_and_versions(tmp_path: Path, snapshot: Snapshot) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(str(path), sample=1.0, seed=1)
    log.record(REQUEST, _decision(REQUEST), snapshot, NOW)
    log.record(REQUEST, Decision(REQUEST.id), snapshot, NOW)  # no bid: nothing to learn
    log.close()
    lines = _lines(path)
    assert [(x["imp_id"], x["bid_id"]) for x in lines] == [("1", "b-req-1-1"), ("2", "b-req-1-2")]
    first = lines[0]
    assert first["request_id"] == "req-1" and first["price"] == 1.5 and first["campaign"] == "camp-1" and first["cqs"] == 0.42
    assert first["model"] == "log-test-1" and first["store"] == "" and first["spec"] == "tafe-cqs-features/1"
    assert first["known"] is False and "known=0" in first["features"] and "sz=300x250" in first["features"]
    assert "fmt=8" in lines[1]["features"] and log.written == 2 and log.errors == 0


def test_sampling_rate_and_seed(tmp_path: Path, snapshot: Snapshot) -> None:
    def run(name: str, sample: float, seed: int | None) -> list[str]:
        path = tmp_path / name
        log = DecisionLog(str(path), sample=sample, seed=seed)
        for n in range(2000):
            request = dataclasses.replace(REQUEST, id=f"r{n}")
            log.record(request, _decision(request, ("1",)), snapshot, NOW)
        log.close()
        return [x["request_id"] for x in _lines(path)] if path.exists() else []

    kept = run("a", 0.25, 7)
    assert 400 < len(kept) < 600
    assert kept == run("b", 0.25, 7)  # same seed, same sample
    assert run("c", 0.0, None) == []
    assert len(run("d", 1.0, None)) == 2000
    with pytest.raises(ValueError):
        DecisionLog(str(tmp_path / "e"), sample=1.5)


def test_unprofilable_users_not_logged(tmp_path: Path, snapshot: Snapshot) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(str(path), sample=1.0)
    for reason in ("coppa", "gdpr_no_vendor"):  # decide says why the privacy rules hid the user
        log.record(REQUEST, _decision(REQUEST, privacy=reason), snapshot, NOW)
    log.close()
    assert path.read_text() == ""


def test_joined_log_trains(tmp_path: Path, snapshot: Snapshot) -> None:
    path = tmp_path / "decisions.jsonl"
    log = DecisionLog(str(path), sample=1.0, seed=3)
    for n in range(400):
        request = dataclasses.replace(REQUEST, id=f"r{n}", country=("DEU", "FRA")[n % 2])
        log.record(request, _decision(request, ("1",)), snapshot, NOW)
    log.close()
    joined = tmp_path / "joined.jsonl"
    with joined.open("w") as f:
        for x in _lines(path):
            x["outcomes"] = {"visit": int("geo=FRA" in x["features"]), "click": 0}
            f.write(json.dumps(x) + "\n")
    model, report = train.train_files([str(joined)], dims=1024, heads=["visit", "click"], version="j-1", holdout=0.25, epochs=5)
    assert report["records"] == 400 and report["heldout"]["visit"]["auc"] == 1.0


def test_workers_sharing_one_file_never_interleave(tmp_path: Path) -> None:
    """Pre-forked workers append to one log: every line stays whole."""
    import os

    path = tmp_path / "decisions.jsonl"
    pids = []
    for worker in range(3):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                snap = Snapshot(model_mod.constant("w", {"visit": 0.0}))
                log = DecisionLog(str(path), sample=1.0)
                for n in range(300):
                    request = dataclasses.replace(REQUEST, id=f"w{worker}-{n}", inventory_cats=("IAB1",) * 4)
                    log.record(request, _decision(request), snap, NOW)
                log.close()
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    lines = _lines(path)
    assert len(lines) == 3 * 300 * 2
    assert {x["request_id"] for x in lines} == {f"w{w}-{n}" for w in range(3) for n in range(300)}
