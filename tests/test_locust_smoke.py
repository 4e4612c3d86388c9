"""Real locust, headless, against a real TAFE process: every answer valid, and some bids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCUST = Path(sys.executable).parent / "locust"


def test_locust_exchange_traffic_gets_only_valid_answers_and_some_bids(tafe_server, tmp_path):
    summary = tmp_path / "summary.json"
    env = {**os.environ, "TRAFFIC_SUMMARY": str(summary), "TRAFFIC_SEED": "11", "TRAFFIC_USER_RPS": "40"}
    cmd = [str(LOCUST), "-f", str(ROOT / "benchmarks" / "locustfile.py"), "--headless", "--host", tafe_server.url]
    cmd += ["-u", "4", "-r", "4", "-t", "4s", "--stop-timeout", "2", "--only-summary", "--csv", str(tmp_path / "locust")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env, cwd=ROOT)
    assert summary.exists(), proc.stdout + proc.stderr
    result = json.loads(summary.read_text())
    assert result["failures"] == 0, result["failure_reasons"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["bid_requests"] >= 20
    assert result["bids"] > 0, "TAFE answered 204 to everything"
    assert 0 < result["bid_rate"] <= 1
    assert (tmp_path / "locust_stats.csv").exists()
    assert result["win_notices"] > 0
    assert "TAFE load test:" in proc.stderr
