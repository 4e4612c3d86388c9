"""The CQS loop closed on a real node: serve, log, run the pipeline on the node's own log, swap, buy better.

A node (``tafe serve --workers 1 --event-log --watch-dir --decision-log-sample 1``) serves
a simulated exchange (second price against one competing bid) whose users click by a
hidden rule: a fifth of them thirty times as often. Round one runs on the bundled demo
model and no store; ``tafe cqs pipeline`` then turns the node's event log into a model
and a store in the watched directory, the node swaps them in without a restart (the
bid responses' ``ext.cqs`` says so), and round two, the same traffic at the same
campaign settings, buys more clicks per dollar.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, start_tafe
from money.exchange import Exchange

pytest.importorskip("numpy")

KEYS = "k1:test-notice-secret-0123456789"
USERS = 100


def clicky(user: str) -> bool:
    return int(user.rsplit("-", 1)[1]) % 5 == 0


def hidden_rule(user: str, imp: dict) -> float:
    return 0.3 if clicky(user) else 0.01


CAMPAIGNS = {
    "currency": "USD",
    "score_pivot": 0.3,
    "campaigns": [{
        "id": "c-loop", "advertiser": "loop", "adomain": ["loop.example"], "base_cpm": 1.0, "max_cpm": 4.0,
        "daily_budget": 1000, "pacing": "asap", "landing_url": "https://loop.example/landing",
        "creatives": [{"id": f"c-loop-{w}x{h}", "format": "banner", "w": w, "h": h,
                       "adm": '<a href="${TAFE_CLICK_URL}"><img src="https://cdn.example/a.png"></a><img src="${TAFE_IMP_URL}">'}
                      for w, h in ((300, 250), (728, 90))],
    }],
}  # fmt: skip
IMPS = [{"banner": {"w": 300, "h": 250}, "bidfloor": 0.1}, {"banner": {"w": 728, "h": 90}, "bidfloor": 0.1}]


def one_round(url: str) -> dict:
    """The same traffic every round (same seed, same views): clicks and what they cost."""
    ledger = Exchange(url, imps=IMPS, users=USERS, competitor_cpm=(1.0, 0.5), bill_retries=0, click_rule=hidden_rule,
                      seed=3).run(60, threads=4, views=600)  # fmt: skip
    assert not ledger.errors, ledger.errors[:3]
    clicks, dollars = sum(ledger.clicks.values()), sum(ledger.billed.values()) / 1e9  # nanos: micros of CPM
    return {"clicks": clicks, "dollars": dollars, "per_dollar": clicks / dollars, "wins": sum(ledger.wins.values()),
            "models": ledger.models}  # fmt: skip


def settle(directory: Path) -> None:
    """Wait until the node has flushed its event log (once a second) and stopped writing."""
    last = -1
    while True:
        time.sleep(1.2)
        size = sum(p.stat().st_size for p in directory.glob("*.jsonl"))
        if size == last:
            return
        last = size


@pytest.mark.slow
def test_the_pipeline_on_a_nodes_own_log_buys_more_clicks_per_dollar(tmp_path: Path) -> None:
    events, watch = tmp_path / "events", tmp_path / "watch"
    watch.mkdir()
    (tmp_path / "campaigns.json").write_text(json.dumps(CAMPAIGNS))
    node = start_tafe("--campaigns", str(tmp_path / "campaigns.json"), "--state", str(tmp_path / "state"),
                      "--event-log", str(events), "--watch-dir", str(watch), "--decision-log-sample", "1",
                      env={"TAFE_NOTICE_KEYS": KEYS})  # fmt: skip
    try:
        before = one_round(node.url)
        assert set(before["models"]) == {"demo-1"}
        settle(events)
        logged = [json.loads(line) for path in events.glob("*.jsonl") for line in path.read_text().splitlines()]
        losses = [e for e in logged if e["event"] == "loss"]
        assert losses and all(e["loss"] == "102" and float(e["min_to_win"]) > 0 for e in losses)  # the exchange's macros
        assert {e["event"] for e in logged} >= {"decision", "win", "imp", "click", "bill", "loss"}
        proc = subprocess.run([sys.executable, "-m", "tafe", "cqs", "pipeline", "--events", str(events), "--out", str(watch),
                               "--dims", "16384"], capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["better"] and len(report["published"]) == 2, json.dumps(report)
        assert sorted(os.listdir(watch)) == sorted(os.path.basename(p) for p in report["published"])
        version = report["new"]["version"]
        deadline = time.monotonic() + 15
        while " model=" + version + " " not in node.output():  # the swap log line names the new version
            assert time.monotonic() < deadline, node.output()[-3000:]
            time.sleep(0.1)
        after = one_round(node.url)
        assert set(after["models"]) == {version}  # swapped in without a restart
    finally:
        code = node.stop()
    assert code == 0, node.output()[-3000:]
    print(f"\nbefore {before}\nafter  {after}\npipeline {json.dumps(report)}")
    assert after["per_dollar"] > 1.2 * before["per_dollar"], (before, after)
